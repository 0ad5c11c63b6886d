"""The dispatcher: claim the next job from the ledger, run it on the GPU worker, record what happens, announce it.

One job at a time, except /imagine: a claimed /imagine job takes along more queued ones that can share its denoising
loop (same size, steps, cfg and sampler, no variation image, at most MAX_BATCH_IMAGES images in all), claimed in the
scheduler's fair order, and the worker serves them with one `run_many`; each is recorded and announced on its own,
and the batch's GPU time is split among them by image count. A training runs in slices (Settings.train_slice_s):
after each slice it goes back to the queue (`ledger.requeue`), queued /imagine jobs get the GPU for a while, then the
same training is claimed again. Cancel requests recorded in the ledger are passed to the worker; time limits come
from Settings. Every job that ends is handed to the notifier, which announces it once (`ledger.mark_delivered`);
jobs that ended while no notifier was attached (or before a restart) are announced when one is.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Protocol

from bot.jobs.ledger import Job, Ledger
from bot.dispatch.worker_client import SHUTTING_DOWN, TIMED_OUT, WorkerClient
from trainer.contract.durations import format_duration
from trainer.contract.errors import UserError
from trainer.contract.imagine_request import DEFAULT_CFG, DEFAULT_COUNT, DEFAULT_STEPS, SCHEDULERS

log = logging.getLogger("boothbot.dispatcher")

CONCEPT_GONE = "The concept for this training was deleted before it ran."
RECORDING_FAILED = "Your job finished, but the bot could not save its result. Please try again."
PREPARE_FAILED = ("The bot could not prepare your job (an internal error). Please try again; if it keeps happening, "
                  "tell a server admin.")
CANCEL_POLL_S = 0.5
PROGRESS_WRITE_INTERVAL_S = 1.0
MAX_BATCH_IMAGES = 8  # as GenerationService.max_batch_images: more would not share one denoising loop


def imagine_batch_key(params: dict) -> tuple | None:
    """/imagine jobs with equal keys can share one denoising loop; None = this one runs alone (a variation, or
    options the worker will reject anyway). Missing options mean the engine's defaults; a missing width or height
    means the model's own size, so it only matches another missing one."""
    if params.get("init_image"):
        return None
    try:
        return (_side(params.get("width")), _side(params.get("height")),
                int(params.get("steps") or DEFAULT_STEPS), float(params.get("cfg") or DEFAULT_CFG),
                str(params.get("scheduler") or SCHEDULERS[0]).strip().lower())
    except (TypeError, ValueError):
        return None


def image_count(params: dict) -> int:
    try:
        return max(1, int(params.get("count") or DEFAULT_COUNT))
    except (TypeError, ValueError):
        return DEFAULT_COUNT


def _side(value) -> int | None:
    return None if value in (None, "") else int(value)


class Notifier(Protocol):
    async def job_progress(self, job: Job, event: dict) -> None: ...

    async def job_finished(self, job: Job) -> None: ...


class LogNotifier:
    """Announces finished jobs in the log only (`python -m bot run --no-discord`). They count as delivered."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def job_progress(self, job: Job, event: dict) -> None:
        pass

    async def job_finished(self, job: Job) -> None:
        if await self.ledger.mark_delivered(job.id):
            outcome = job.error or ", ".join(f"{k}={v}" for k, v in (job.result or {}).items() if k != "parameters")
            log.info("delivered job %s (%s, %s): %s", job.id, job.kind, job.status, outcome[:300])


class Dispatcher:
    def __init__(self, settings, ledger: Ledger, concepts, gallery, worker: WorkerClient, *,
                 notifier: Notifier | None = None, poll_s: float = 1.0):
        self.settings = settings
        self.ledger = ledger
        self.concepts = concepts
        self.gallery = gallery
        self.worker = worker
        self.notifier = notifier
        self.poll_s = poll_s
        self.current_job_id: int | None = None  # the job on the GPU (the first of a batch)
        self.batches_run = 0  # run_many requests sent (logs, tests)
        self._busy = False  # from a claim until its job (every slice) has been recorded
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._last_progress_write: dict[int, float] = {}

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left behind, then run the queue in the background."""
        for job in await self.ledger.recover_at_start():
            log.warning("job %s (%s) was running when the bot stopped: now %s", job.id, job.kind, job.status)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="dispatcher")
        if self.notifier is not None:
            self._spawn(self.deliver_backlog())

    def set_notifier(self, notifier: Notifier | None) -> None:
        """Attach the announcer (the Discord delivery cog) and announce whatever waited for one."""
        self.notifier = notifier
        if notifier is not None and self._task is not None:
            self._spawn(self.deliver_backlog())

    def wake(self) -> None:
        """A job was queued: look at the queue now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Claim nothing new; give the running job (or training slice) `grace_s` to end, then stop waiting for it.
        A job still running then stays `running` in the ledger and is recovered at the next start."""
        self._stopping = True
        self._wake.set()
        grace_s = self.settings.train_slice_s + 15.0 if grace_s is None else grace_s
        if self._task is not None:
            if not self._busy:
                self._task.cancel()  # waiting for the worker or for work: nothing to finish
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), grace_s)
                except TimeoutError:
                    log.warning("job %s did not end within %.0f s of shutdown; it resumes or is reported at the next "
                                "start", self.current_job_id, grace_s)
                    self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # --- the loop -----------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.worker.wait_ready()
                if await self.run_next() is None:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the queue for good
                log.exception("the dispatcher loop failed; retrying in %.0f s", self.poll_s)
                await asyncio.sleep(self.poll_s)

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def run_next(self) -> Job | None:
        """Claim the next job in fair order and run it to its end (a training through all its slices, with /imagine
        jobs in between). Returns the job as claimed, or None when nothing is queued (or the queue is paused)."""
        self._busy = True
        try:
            job = await self.ledger.claim_next()
            if job is not None:
                try:
                    await self._run_claimed(job)
                except Exception:
                    await self._fail_after_bot_error(job)
                    raise
            return job
        finally:
            self._busy = False

    async def _fail_after_bot_error(self, job: Job) -> None:
        """The bot itself broke while running or recording `job` (say, a database error): end it as failed and
        tell the member, rather than leave it `running` until the next restart."""
        log.exception("job %s: the bot failed while running or recording it", job.id)
        message = (f"Something went wrong on the bot's side with job {job.id}; please try again. "
                   "If it keeps happening, tell a server admin.")
        try:
            if await self.ledger.fail(job.id, message):
                await self._announce(job.id)
        except Exception:  # the database is still failing: the next start recovers the job
            log.exception("job %s: could not record the failure either", job.id)

    async def _run_claimed(self, job: Job) -> None:
        if job.kind == "imagine":
            companions = await self._claim_companions(job)
            if companions:
                await self._run_imagine_batch([job, *companions])
                return
        while True:
            end, seconds = await self._run_once(job)
            if end is None:
                return  # shutting down mid-job: the ledger keeps it running; the next start recovers it
            if end["event"] != "paused":
                await self._record_end(job, end, seconds)
                await self._announce(job.id)
                return
            if not await self.ledger.requeue(job.id, seconds):
                await self._announce(job.id)  # a cancel arrived during the slice: requeue made it cancelled
                return
            if self._stopping:
                return  # queued with its checkpoint; the next start continues it
            await self._imagine_between_slices()
            next_slice = await self.ledger.claim(job.id)
            if next_slice is None:
                latest = await self.ledger.get(job.id)
                if latest is not None and latest.is_terminal:
                    await self._announce(job.id)  # cancelled while waiting for its next slice
                return  # otherwise the queue was paused: it waits, queued, like every other job
            job = next_slice

    async def _imagine_between_slices(self) -> None:
        budget_end = time.monotonic() + self.settings.train_slice_s
        while not self._stopping and time.monotonic() < budget_end:
            job = await self.ledger.claim_next(kinds=("imagine",))
            if job is None:
                return
            try:
                await self._run_claimed(job)
            except Exception:  # the bot broke on this /imagine job: it fails, the training it interrupted goes on
                await self._fail_after_bot_error(job)
                return

    # --- /imagine batches ----------------------------------------------------------------------------------------

    async def _claim_companions(self, first: Job) -> list[Job]:
        """Queued /imagine jobs that can share `first`'s denoising loop, claimed in fair order."""
        key = imagine_batch_key(first.params)
        if key is None:
            return []

        def fits(job: Job, taken: list[Job]) -> bool:
            images = sum(image_count(j.params) for j in (first, *taken, job))
            return imagine_batch_key(job.params) == key and images <= MAX_BATCH_IMAGES

        return await self.ledger.claim_matching(fits, MAX_BATCH_IMAGES - 1, kinds=("imagine",))

    async def _run_imagine_batch(self, jobs: list[Job]) -> None:
        """Run claimed /imagine jobs as one `run_many`; record and announce each as the single path does."""
        try:
            outcomes = await self._run_batch_once(jobs)
            for job in jobs:
                if job.id not in outcomes:
                    continue  # shutting down mid-batch: it stays running; the next start recovers it
                end, seconds = outcomes[job.id]
                await self._record_end(job, end, seconds)
                await self._announce(job.id)
        except Exception:
            for job in jobs:  # each still running fails with a message (the ledger ignores finished ones)
                await self._fail_after_bot_error(job)
            raise

    async def _run_batch_once(self, jobs: list[Job]) -> dict[int, tuple[dict, float]]:
        """Send the jobs to the worker as one batch: {job_id: (end event, its GPU seconds)}, the batch's time split
        by image count. A job whose params cannot be prepared fails without the GPU (0 s)."""
        self.current_job_id = jobs[0].id
        outcomes: dict[int, tuple[dict, float]] = {}
        try:
            requests, served = [], {}
            for job in jobs:
                params, failure = await self._params_or_failure(job)
                if failure is not None:  # bad stored params end the job, not the batch
                    outcomes[job.id] = (failure, 0.0)
                    continue
                requests.append({"job_id": job.id, "kind": "imagine", "params": params})
                served[job.id] = job
            if not served:
                return outcomes
            images = {job_id: image_count(job.params) for job_id, job in served.items()}
            log.info("running /imagine jobs %s as one batch (%d images)", ", ".join(map(str, served)),
                     sum(images.values()))
            watcher = asyncio.create_task(self._pass_on_cancels(list(served)), name=f"cancel-watch-{jobs[0].id}")
            started = time.monotonic()
            self.batches_run += 1
            try:
                ends = await self.worker.run_many(
                    requests, timeout_s=sum(self._time_left(job) for job in served.values()),
                    on_progress=lambda event: self._progress(served[event["job_id"]], event))
            finally:
                watcher.cancel()
            seconds = time.monotonic() - started
            for job_id, end in ends.items():
                if not (self._stopping and end.get("error") == SHUTTING_DOWN):
                    outcomes[job_id] = (end, seconds * images[job_id] / sum(images.values()))
            return outcomes
        finally:
            self.current_job_id = None
            for job in jobs:
                self._last_progress_write.pop(job.id, None)

    async def _pass_on_cancels(self, job_ids: list[int]) -> None:
        waiting = list(job_ids)
        while waiting:
            await asyncio.sleep(CANCEL_POLL_S)
            for job_id in list(waiting):
                if await self.ledger.cancel_requested(job_id):
                    log.info("cancelling job %s at its next step", job_id)
                    await self.worker.cancel(job_id)
                    waiting.remove(job_id)

    async def _run_once(self, job: Job) -> tuple[dict | None, float]:
        """Send the job (or its next slice) to the worker; returns (end event, GPU seconds of this run)."""
        self.current_job_id = job.id
        try:
            params, failure = await self._params_or_failure(job)
            if failure is not None:
                return failure, 0.0
            timeout_s = self._time_left(job)
            if timeout_s <= 0:
                limit = format_duration(self.settings.train_timeout_s)
                return _failed(job.id, TIMED_OUT.format(limit=limit)), 0.0
            watcher = asyncio.create_task(self._pass_on_cancels([job.id]), name=f"cancel-watch-{job.id}")
            started = time.monotonic()
            try:
                end = await self.worker.run(job.id, job.kind, params, timeout_s=timeout_s,
                                            on_progress=lambda event: self._progress(job, event))
            finally:
                watcher.cancel()
            seconds = time.monotonic() - started
            if self._stopping and end.get("error") == SHUTTING_DOWN:
                return None, seconds
            return end, seconds
        finally:
            self.current_job_id = None
            self._last_progress_write.pop(job.id, None)

    async def _params_or_failure(self, job: Job) -> tuple[dict | None, dict | None]:
        """(the job's worker params, None), or (None, its `failed` end event) when it cannot be prepared: bad stored
        params or a vanished concept end the job, not the dispatcher."""
        try:
            return await self.worker_params(job), None
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, UserError):
                log.exception("could not prepare job %s", job.id)
            return None, _failed(job.id, str(e) if isinstance(e, UserError) else PREPARE_FAILED)

    def _time_left(self, job: Job) -> float:
        if job.kind == "train":
            return self.settings.train_timeout_s - (job.gpu_seconds or 0.0)  # earlier slices count too
        return float(self.settings.imagine_timeout_s)

    async def _progress(self, job: Job, event: dict) -> None:
        now = time.monotonic()
        last = self._last_progress_write.get(job.id, 0.0)
        # Class-image events count images, not the job's steps, and their ETA is for the images only: the queue keeps
        # its own estimate for the job until training reports.
        counts_steps = event.get("stage") != "class_images"
        if counts_steps and (now - last >= PROGRESS_WRITE_INTERVAL_S or event["step"] == event["total"]):
            self._last_progress_write[job.id] = now
            await self.ledger.record_progress(job.id, event["step"], event["total"], event.get("eta_s"),
                                              event.get("preview"))
        if self.notifier is not None:
            try:
                await self.notifier.job_progress(job, event)
            except Exception:
                log.exception("the notifier failed to show progress of job %s", job.id)

    # --- params for the worker ----------------------------------------------------------------------------------

    async def worker_params(self, job: Job) -> dict:
        """The job's stored params plus what the bot decides at run time: paths under the data directory and the
        concepts this member may use right now."""
        data_dir = Path(self.settings.data_dir).resolve()
        preview = str(data_dir / "previews" / f"{job.id}.webp")
        if job.kind == "train":
            concept = await self.concepts.get(job.params["concept_id"])
            if concept is None or concept.status == "deleted":
                raise UserError(CONCEPT_GONE)
            concept_dir = Path(self.concepts.concept_dir(concept.id)).resolve()
            return {**job.params, "concept_id": concept.id, "token": concept.token,
                    "class_name": concept.class_name, "style": bool(concept.style),
                    "photos_dir": str(concept_dir / "photos"), "out_dir": str(concept_dir),
                    "cache_dir": str(data_dir / "cache"), "slice_s": self.settings.train_slice_s,
                    "seed": job.params.get("seed", job.id), "preview_path": preview}
        if job.kind == "imagine":
            usable = await self.concepts.usable(job.guild_id, job.owner_id)
            forbidden = await self.concepts.forbidden_tokens(job.guild_id, job.owner_id)
            concepts = [{"concept_id": c.id, "token": c.token, "class_name": c.class_name,
                         "lora_path": c.lora_path, "weight": 1.0} for c in usable if c.lora_path]
            return {"safety": self.settings.safety, **job.params, "concepts": concepts,
                    "forbidden_tokens": forbidden, "out_dir": str(data_dir / "images" / str(job.id)),
                    "job_id": job.id, "preview_path": preview}
        raise ValueError(f"job {job.id} has unknown kind {job.kind!r}")

    # --- endings ------------------------------------------------------------------------------------------------

    async def _record_end(self, job: Job, end: dict, seconds: float) -> None:
        kind = end["event"]
        if kind == "done":
            try:
                await self._keep_result(job, end["result"])
            except Exception:
                log.exception("job %s finished but its result could not be recorded", job.id)
                await self.ledger.fail(job.id, RECORDING_FAILED, seconds)
                return
            recorded = await self.ledger.succeed(job.id, end["result"], seconds)
        elif kind == "cancelled":
            recorded = await self.ledger.confirm_cancelled(job.id, seconds)
        else:
            if end.get("detail"):
                log.error("job %s (%s) failed: %s\n%s", job.id, job.kind, end["error"], end["detail"])
            else:
                log.info("job %s (%s) failed: %s", job.id, job.kind, end["error"])
            recorded = await self.ledger.fail(job.id, end["error"], seconds)
        if not recorded:
            log.warning("job %s was no longer running when it ended (%s); its record was left as it was", job.id, kind)

    async def _keep_result(self, job: Job, result: dict) -> None:
        if job.kind == "train":
            await self.concepts.mark_ready(job.params["concept_id"], result["lora"], result.get("lora_kohya"))
        elif job.kind == "imagine":
            await self.gallery.add(job.id, job.owner_id, job.guild_id, list(result.get("images", [])),
                                   list(result.get("seeds", [])), job.params.get("prompt", ""))

    async def _announce(self, job_id: int) -> None:
        if self.notifier is None:
            return  # announced by deliver_backlog once a notifier is attached
        job = await self.ledger.get(job_id)
        if job is None or not job.is_terminal or job.delivered_at is not None:
            return
        try:
            await self.notifier.job_finished(job)
        except Exception:
            log.exception("the notifier failed to announce job %s; it is retried at the next start", job_id)

    async def deliver_backlog(self) -> int:
        """Announce finished jobs that were never announced (restart, or no notifier then). Returns how many."""
        jobs = await self.ledger.undelivered()
        for job in jobs:
            await self._announce(job.id)
        if jobs:
            log.info("announced %d job(s) that had finished without being announced", len(jobs))
        return len(jobs)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _failed(job_id: int, error: str) -> dict:
    return {"event": "failed", "job_id": job_id, "error": error, "detail": ""}

