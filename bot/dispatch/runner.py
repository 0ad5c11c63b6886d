"""The runner: one GPU worker's work. Claim a job, send it to the worker, record what happens, hand it on.

Nothing here depends on a job's kind by name: its registry entry (bot/jobs/kinds.py) gives the worker params, the
time limit, what to keep of a result and whether queued jobs may share its run. A claimed job whose kind batches
takes along queued jobs with the same batch key, claimed in the scheduler's fair order, and the worker serves them
with one `run_many`; each is recorded and announced on its own, the batch's GPU time split by their shares. When
the claim found companions (members' jobs are arriving together) and the batch has room, it waits up to
Settings.batch_window_ms for more before it starts; a lone job starts at once. A job the worker pauses (a training
yielded because a job waits, bot/dispatch/yielding.py, or its slice ended) goes back to the queue (`ledger.requeue`),
queued jobs of kinds that run between slices get the GPU for Settings.imagine_between_slices_s, then the same job is claimed again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from bot.dispatch.affinity import LoraAffinity
from bot.dispatch.announcer import Announcer
from bot.dispatch.cancels import passing_on_cancels
from bot.dispatch.endings import failed, record_end
from bot.dispatch.progress import ProgressRecorder
from bot.dispatch.worker_api import GpuWorker
from bot.dispatch.worker_client import CRASHED, SHUTTING_DOWN, TIMED_OUT
from bot.dispatch.yielding import YieldOnDemand
from trainer.contract.durations import format_duration
from bot.jobs.kinds import KindContext, between_slices, kind_of
from bot.jobs.ledger import MAX_RECOVERIES, Job, Ledger
from bot import metrics
from trainer.contract.errors import UserError

log = logging.getLogger("boothbot.dispatcher")

PREPARE_FAILED = ("The bot could not prepare your job (an internal error). Please try again; if it keeps happening, "
                  "tell a server admin.")


Claimer = Callable[[Sequence[str] | None], Awaitable[Job | None]]


class Runner:
    """Runs claimed jobs on its own worker (one lane of the dispatcher), one request at a time."""

    def __init__(self, context: KindContext, ledger: Ledger, worker: GpuWorker, announcer: Announcer, *,
                 claim_next: Claimer | None = None):
        self.context = context
        self.ledger = ledger
        self.worker = worker
        self.announcer = announcer
        # How this lane takes its next job (kinds, or None for every kind): the dispatcher's lane affinity, or plainly
        # the fair first.
        self.claim_next = claim_next or ledger.claim_next
        self.affinity = LoraAffinity()  # the LoRAs this runner's worker was last sent
        self.progress = ProgressRecorder(ledger, announcer)
        self.yields = YieldOnDemand(ledger, worker)  # a training pauses when someone waits
        self.stopping = False  # set by the dispatcher: finish the running request, start no slice or batch after it
        self.current_job_id: int | None = None  # the job on the GPU (the first of a batch)
        self.batches_run = 0  # run_many requests sent (logs, tests)
        self.jobs_run = 0  # jobs whose end this runner recorded (/queue admin workers)
        self.batch_windows_waited = 0  # batches that waited for more members' jobs (logs, tests)
        self._arrivals = asyncio.Event()  # set by job_queued(): ends a batch window's wait early

    def job_queued(self) -> None:
        """A job was queued (the dispatcher's wake): a batch waiting for companions claims again now."""
        self._arrivals.set()

    async def run_next(self) -> Job | None:
        """Claim the next job in fair order and run it to its end (a training through all its slices, with /imagine
        jobs in between). Returns the job as claimed, or None when nothing is queued (or the queue is paused)."""
        job = await self.claim_next(None)
        if job is not None:
            try:
                await self._run_claimed(job)
            except Exception:
                await self._fail_after_bot_error(job)
                raise
        return job

    async def worker_params(self, job: Job) -> dict:
        return await kind_of(job.kind).worker_params(job, self.context)

    async def _fail_after_bot_error(self, job: Job) -> None:
        """The bot itself broke while running or recording `job` (say, a database error): end it as failed and
        tell the member, rather than leave it `running` until the next restart."""
        log.exception("job %s: the bot failed while running or recording it", job.id)
        message = (f"Something went wrong on the bot's side with job {job.id}; please try again. "
                   "If it keeps happening, tell a server admin.")
        try:
            if await self.ledger.fail(job.id, message):
                await self.announcer.finished(job.id)
        except Exception:  # the database is still failing: the next start recovers the job
            log.exception("job %s: could not record the failure either", job.id)

    async def _run_claimed(self, job: Job) -> None:
        companions = await self._claim_companions(job)
        if companions:
            await self._run_batch([job, *companions])
            return
        while True:
            end, seconds = await self._run_once(job)
            if end is None:
                return  # shutting down mid-job: the ledger keeps it running; the next start recovers it
            if self._goes_on_after_crash(job, end):
                await self._requeue_after_crash(job, seconds)
                return
            if end["event"] != "paused":
                await record_end(self.ledger, self.context, job, end, seconds)
                self.jobs_run += 1
                await self.announcer.finished(job.id)
                return
            job = await self._next_slice(job, seconds)
            if job is None:
                return

    def _goes_on_after_crash(self, job: Job, end: dict) -> bool:
        """The worker died under a job that keeps checkpoints (a training): it goes on from its last one, as after a
        restart of the bot, unless that happened too often already (a job that kills the worker every time)."""
        return (end["event"] == "failed" and end.get("error") == CRASHED and not self.stopping
                and kind_of(job.kind).resumable and job.attempts < MAX_RECOVERIES)

    async def _requeue_after_crash(self, job: Job, seconds: float) -> None:
        if await self.ledger.requeue(job.id, seconds, count_attempt=True):
            log.warning("job %s (%s): the GPU worker died under it; it goes on from its last checkpoint once the worker "
                        "is back (recovery %d of %d)", job.id, job.kind, job.attempts + 1, MAX_RECOVERIES)
        else:
            await self.announcer.finished(job.id)  # a cancel arrived meanwhile: requeue made it cancelled

    # --- slices ---------------------------------------------------------------------------------------------------

    async def _next_slice(self, job: Job, seconds: float) -> Job | None:
        """A slice of `job` ended: requeue it, let waiting jobs run for a while, claim it again. None when it does
        not go on now (cancelled, the queue paused, or the bot shutting down: it waits, queued, with its checkpoint)."""
        if not await self.ledger.requeue(job.id, seconds):
            await self.announcer.finished(job.id)  # a cancel arrived during the slice: requeue made it cancelled
            return None
        if self.stopping:
            return None  # queued with its checkpoint; the next start continues it
        await self._run_between_slices()
        next_slice = await self.ledger.claim(job.id)
        if next_slice is None:
            latest = await self.ledger.get(job.id)
            if latest is not None and latest.is_terminal:
                await self.announcer.finished(job.id)  # cancelled while waiting for its next slice
            return None  # otherwise the queue was paused: it waits, queued, like every other job
        return next_slice

    async def _run_between_slices(self) -> None:
        budget_end = time.monotonic() + self.context.settings.imagine_between_slices_s
        while not self.stopping and time.monotonic() < budget_end:
            job = await self.claim_next(between_slices())
            if job is None:
                return
            try:
                await self._run_claimed(job)
            except Exception:  # the bot broke on this job: it fails, the training it interrupted goes on
                await self._fail_after_bot_error(job)
                return

    # --- batches --------------------------------------------------------------------------------------------------

    async def _claim_companions(self, first: Job) -> list[Job]:
        """Queued jobs that may share `first`'s `run_many` (same kind, same batch key, shares within the limit). If
        some were queued already but the batch has room, the queue is busy: more members' jobs are likely moments
        away, so it keeps claiming until the batch is full or the batch window has passed."""
        kind = kind_of(first.kind)
        key = kind.batch_key(first.params)
        if key is None:
            return []
        taken: list[Job] = []

        def shares(*more: Job) -> int:
            return sum(kind.batch_share(j.params) for j in (first, *taken, *more))

        def fits(job: Job, claiming: list[Job]) -> bool:
            return kind.batch_key(job.params) == key and shares(*claiming, job) <= kind.batch_limit

        async def claim_more() -> None:
            self._arrivals.clear()
            room = kind.batch_limit - 1 - len(taken)
            taken.extend(await self.ledger.claim_matching(fits, room, kinds=(kind.name,)) if room > 0 else [])

        await claim_more()
        window_s = self.context.settings.batch_window_ms / 1000
        if not taken or window_s <= 0 or self.stopping or shares() >= kind.batch_limit:
            return taken
        self.batch_windows_waited += 1
        deadline = time.monotonic() + window_s
        try:
            while shares() < kind.batch_limit and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrivals.wait(), left)
                await claim_more()
        except Exception:  # a later claim failed (say, a database error): run what is claimed, lose none of it
            log.exception("could not claim more jobs for the batch of job %s; it runs with %d", first.id,
                          len(taken) + 1)
        return taken

    async def _run_batch(self, jobs: list[Job]) -> None:
        """Run claimed jobs as one `run_many`; record and announce each as the single path does."""
        try:
            outcomes = await self._run_batch_once(jobs)
            ended = [job for job in jobs if job.id in outcomes]  # the others: shutting down mid-batch, they stay
            for job in ended:                                     # running and the next start recovers them
                end, seconds = outcomes[job.id]
                await record_end(self.ledger, self.context, job, end, seconds)
                self.jobs_run += 1
            # Every member's result goes out at once: one after another, the last of a batch of 8 waited for 7 posts.
            await asyncio.gather(*(self.announcer.finished(job.id) for job in ended))
        except Exception:
            for job in jobs:  # each still running fails with a message (the ledger ignores finished ones)
                await self._fail_after_bot_error(job)
            raise

    async def _run_batch_once(self, jobs: list[Job]) -> dict[int, tuple[dict, float]]:
        """Send the jobs to the worker as one batch: {job_id: (end event, its GPU seconds)}, the batch's time split
        by share. A job whose params cannot be prepared fails without the GPU (0 s)."""
        self.current_job_id = jobs[0].id
        outcomes: dict[int, tuple[dict, float]] = {}
        try:
            requests, served = [], {}
            for job in jobs:
                params, failure = await self._params_or_failure(job)
                if failure is not None:  # bad stored params end the job, not the batch
                    outcomes[job.id] = (failure, 0.0)
                    continue
                requests.append({"job_id": job.id, "kind": job.kind, "params": params})
                served[job.id] = job
                self.affinity.remember(job, params)
            if not served:
                return outcomes
            shares = {job_id: kind_of(job.kind).batch_share(job.params) for job_id, job in served.items()}
            log.info("running %s jobs %s as one batch", jobs[0].kind, ", ".join(map(str, served)))
            started = time.monotonic()
            self.batches_run += 1
            async with passing_on_cancels(self.ledger, self.worker, list(served)):
                ends = await self.worker.run_many(
                    requests, timeout_s=sum(self._time_left(job) for job in served.values()),
                    on_progress=lambda event: self.progress(served[event["job_id"]], event))
            seconds = time.monotonic() - started
            metrics.lane_busy(self.worker.label, seconds)
            for job_id, end in ends.items():
                if not self._stopped_by_shutdown(end):
                    outcomes[job_id] = (end, seconds * shares[job_id] / sum(shares.values()))
            return outcomes
        finally:
            self.current_job_id = None
            for job in jobs:
                self.progress.forget(job.id)

    # --- one run --------------------------------------------------------------------------------------------------

    async def _run_once(self, job: Job) -> tuple[dict | None, float]:
        """Send the job (or its next slice) to the worker; returns (end event, GPU seconds of this run), or
        (None, seconds) when the bot's shutdown stopped it."""
        self.current_job_id = job.id
        try:
            params, failure = await self._params_or_failure(job)
            if failure is not None:
                return failure, 0.0
            timeout_s = self._time_left(job)
            if timeout_s <= 0:
                limit = format_duration(kind_of(job.kind).timeout_s(self.context.settings))
                return failed(job.id, TIMED_OUT.format(limit=limit)), 0.0
            self.affinity.remember(job, params)
            started = time.monotonic()
            async with passing_on_cancels(self.ledger, self.worker, [job.id]), self.yields.while_running(job):
                end = await self.worker.run(job.id, job.kind, params, timeout_s=timeout_s,
                                            on_progress=lambda event: self.progress(job, event))
            seconds = time.monotonic() - started
            metrics.lane_busy(self.worker.label, seconds)
            return (None if self._stopped_by_shutdown(end) else end), seconds
        finally:
            self.current_job_id = None
            self.progress.forget(job.id)

    async def _params_or_failure(self, job: Job) -> tuple[dict | None, dict | None]:
        """(the job's worker params, None), or (None, its `failed` end event) when it cannot be prepared: bad stored
        params or a vanished concept end the job, not the runner."""
        try:
            return await self.worker_params(job), None
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, UserError):
                log.exception("could not prepare job %s", job.id)
            return None, failed(job.id, str(e) if isinstance(e, UserError) else PREPARE_FAILED)

    def _time_left(self, job: Job) -> float:
        # A sliced job's earlier slices count too (their GPU seconds are already recorded).
        return kind_of(job.kind).timeout_s(self.context.settings) - (job.gpu_seconds or 0.0)

    def _stopped_by_shutdown(self, end: dict) -> bool:
        return self.stopping and end.get("error") == SHUTTING_DOWN
