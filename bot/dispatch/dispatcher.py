"""The dispatcher: keeps the queue moving. At start it recovers what a previous run left behind, then its loop hands
the next job to the runner (bot/dispatch/runner.py: claim → send to the worker → record → announce) whenever the
worker is ready, waking early when a job is queued.

The parts: runner.py (one worker's jobs: batches, training slices, time limits), endings.py (recording an end),
progress.py (progress into the ledger and to the notifier), cancels.py (cancel requests to the worker),
announcer.py (the notifier), outbox.py (delivery of finished jobs until confirmed: retries, the backlog). What
differs between job kinds is in bot/jobs/kinds.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from bot.dispatch.announcer import Announcer, Notifier
from bot.dispatch.prefill import IdlePrefill
from bot.dispatch.runner import Runner
from bot.dispatch.worker_client import WorkerClient
from bot.jobs.kinds import KindContext
from bot.jobs.ledger import Job, Ledger

log = logging.getLogger("boothbot.dispatcher")

SHUTDOWN_GRACE_S = 15.0  # beyond one training slice: how long stop() waits for the running job


class Dispatcher:
    def __init__(self, settings, ledger: Ledger, concepts, gallery, worker: WorkerClient, *,
                 notifier: Notifier | None = None, poll_s: float = 1.0):
        self.ledger = ledger
        self.worker = worker
        self.poll_s = poll_s
        self.context = KindContext(settings, concepts, gallery)
        self.announcer = Announcer(ledger, notifier)
        self.runner = Runner(self.context, ledger, worker, self.announcer)
        self.prefill = IdlePrefill(ledger.store, worker)  # class images while the queue is empty
        self._busy = False  # from a claim until its job (every slice) has been recorded
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def settings(self):
        return self.context.settings

    @settings.setter
    def settings(self, settings) -> None:
        self.context.settings = settings

    @property
    def notifier(self) -> Notifier | None:
        return self.announcer.notifier

    @notifier.setter
    def notifier(self, notifier: Notifier | None) -> None:
        self.announcer.notifier = notifier

    @property
    def current_job_id(self) -> int | None:
        return self.runner.current_job_id

    @property
    def batches_run(self) -> int:
        return self.runner.batches_run

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left behind, then run the queue in the background."""
        for job in await self.ledger.recover_at_start():
            log.warning("job %s (%s) was running when the bot stopped: now %s", job.id, job.kind, job.status)
        self._stopping = self.runner.stopping = False
        self._task = asyncio.create_task(self._loop(), name="dispatcher")
        if self.notifier is not None:
            self._attach_delivery()

    def set_notifier(self, notifier: Notifier | None) -> None:
        """Attach the announcer (the Discord delivery cog) and announce whatever waited for one."""
        self.notifier = notifier
        if notifier is not None and self._task is not None:
            self._attach_delivery()

    def _attach_delivery(self) -> None:
        self.announcer.outbox.start()
        self._spawn(self.deliver_backlog())

    def wake(self) -> None:
        """A job was queued: look at the queue now rather than at the next poll (a running training yields to it)."""
        self._wake.set()
        self.runner.yields.job_queued()

    async def stop(self, grace_s: float | None = None) -> None:
        """Claim nothing new; give the running job (or training slice) `grace_s` to end, then stop waiting for it.
        A job still running then stays `running` in the ledger and is recovered at the next start."""
        self._stopping = self.runner.stopping = True
        self._wake.set()
        await self.runner.yields.now()  # a running training checkpoints and ends its run at its next step
        grace_s = (self.settings.train_slice_s or 0.0) + SHUTDOWN_GRACE_S if grace_s is None else grace_s
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
        await self.announcer.outbox.stop()

    # --- the loop -----------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.worker.wait_ready()
                if await self.run_next() is None:
                    await self.prefill.queue_empty()
                    await self._idle()
                else:
                    self.prefill.work_ran()
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
        """Claim the next job in fair order and run it to its end (see Runner.run_next); None when nothing is
        queued (or the queue is paused)."""
        self._busy = True
        try:
            return await self.runner.run_next()
        finally:
            self._busy = False

    async def worker_params(self, job: Job) -> dict:
        """What the worker gets for `job` if it ran now (bot/jobs/kinds.py)."""
        return await self.runner.worker_params(job)

    async def deliver_backlog(self) -> int:
        return await self.announcer.deliver_backlog()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
