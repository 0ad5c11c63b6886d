"""The dispatcher: keeps the queue moving. At start it recovers what a previous run left behind, then runs one loop per
lane (bot/dispatch/lanes.py: one GPU worker each). A lane's loop hands the next job to its runner
(bot/dispatch/runner.py: claim → send to the worker → record → announce) whenever its worker is ready, waking early
when a job is queued. An /imagine goes to a lane that already holds its LoRAs when that costs no one their turn.

The parts: lanes.py (a worker and its runner, its state), runner.py (one worker's jobs: batches, training slices, time
limits), affinity.py (which LoRAs a lane's worker holds), endings.py (recording an end),
progress.py (progress into the ledger and to the notifier), cancels.py (cancel requests to the worker),
announcer.py (the notifier), outbox.py (delivery of finished jobs until confirmed: retries, the backlog). What
differs between job kinds is in bot/jobs/kinds.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from bot.dispatch.announcer import Announcer, Notifier
from bot.dispatch.lanes import Lane, LaneStatus
from bot.dispatch.prefill import IdlePrefill
from bot.dispatch.runner import Runner
from bot.dispatch.worker_api import GpuWorker
from bot.jobs.kinds import KindContext
from bot.jobs.ledger import Job, Ledger

log = logging.getLogger("boothbot.dispatcher")

SHUTDOWN_GRACE_S = 15.0  # beyond one training slice: how long stop() waits for the running job


class Dispatcher:
    def __init__(self, settings, ledger: Ledger, concepts, gallery, workers: GpuWorker | Sequence[GpuWorker], *,
                 notifier: Notifier | None = None, poll_s: float = 1.0):
        self.ledger = ledger
        self.poll_s = poll_s
        self.context = KindContext(settings, concepts, gallery)
        self.announcer = Announcer(ledger, notifier)
        workers = [workers] if isinstance(workers, GpuWorker) else list(workers)
        if not workers:
            raise ValueError("the dispatcher needs at least one worker")
        self.lanes: list[Lane] = []
        for worker in workers:
            lane = Lane(worker, None)
            lane.runner = Runner(self.context, ledger, worker, self.announcer,
                                 claim_next=lambda kinds, lane=lane: self._claim_for(lane, kinds))
            self.lanes.append(lane)
        ledger.lanes = len(self.lanes)  # queue ETAs: this many jobs run at once
        for lane in self.lanes:  # a training yields only when no other lane could take the waiting job
            lane.runner.yields.other_lane_free = lambda lane=lane: any(
                other is not lane and other.can_take_work for other in self.lanes)
        self.prefill = IdlePrefill(ledger.store, self.lanes[0].worker)  # class images while the queue is empty
        self._stopping = False
        self._task: asyncio.Task | None = None  # the lane loops, together
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
    def workers(self) -> list[GpuWorker]:
        return [lane.worker for lane in self.lanes]

    @property
    def worker(self) -> GpuWorker:
        """The first lane's worker (a bot with one worker has only that one)."""
        return self.lanes[0].worker

    @property
    def runner(self) -> Runner:
        return self.lanes[0].runner

    @property
    def current_job_id(self) -> int | None:
        """A job on a GPU now (the first lane's that has one)."""
        return next((lane.runner.current_job_id for lane in self.lanes if lane.runner.current_job_id), None)

    @property
    def batches_run(self) -> int:
        return sum(lane.runner.batches_run for lane in self.lanes)

    def lane_statuses(self) -> list[LaneStatus]:
        return [lane.status() for lane in self.lanes]

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left behind, then run the queue in the background."""
        for job in await self.ledger.recover_at_start():
            log.warning("job %s (%s) was running when the bot stopped: now %s", job.id, job.kind, job.status)
        self._set_stopping(False)
        self._task = asyncio.create_task(self._run_lanes(), name="dispatcher")
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
        """A job was queued (or went back to the queue): every lane looks at the queue now, not at its next poll."""
        for lane in self.lanes:
            lane.wake.set()
            lane.runner.job_queued()
            lane.runner.yields.job_queued()

    def _set_stopping(self, stopping: bool) -> None:
        self._stopping = stopping
        for lane in self.lanes:
            lane.runner.stopping = stopping

    async def stop(self, grace_s: float | None = None) -> None:
        """Claim nothing new; give each lane's running job (or training slice) `grace_s` to end, then stop waiting
        for it. A job still running then stays `running` in the ledger and is recovered at the next start."""
        self._set_stopping(True)
        self.wake()
        # a running training checkpoints and ends its run at its next step
        await asyncio.gather(*(lane.runner.yields.now() for lane in self.lanes))
        grace_s = (self.settings.train_slice_s or 0.0) + SHUTDOWN_GRACE_S if grace_s is None else grace_s
        if self._task is not None:
            await asyncio.gather(*(self._stop_lane(lane, grace_s) for lane in self.lanes))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.announcer.outbox.stop()

    async def _stop_lane(self, lane: Lane, grace_s: float) -> None:
        task = lane.task
        if task is None or task.done():
            return
        if not lane.busy:
            task.cancel()  # waiting for the worker or for work: nothing to finish
        else:
            try:
                await asyncio.wait_for(asyncio.shield(task), grace_s)
            except TimeoutError:
                log.warning("job %s did not end within %.0f s of shutdown; it resumes or is reported at the next "
                            "start", lane.runner.current_job_id, grace_s)
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # --- the loop -----------------------------------------------------------------------------------------------

    async def _run_lanes(self) -> None:
        for lane in self.lanes:
            lane.task = asyncio.create_task(self._loop(lane), name=f"lane-{lane.label}")
        try:  # a lane stopped by `stop` ends on its own; the others keep going until theirs do
            await asyncio.gather(*(lane.task for lane in self.lanes), return_exceptions=True)
        except asyncio.CancelledError:
            for lane in self.lanes:
                lane.task.cancel()
            raise

    async def _loop(self, lane: Lane) -> None:
        while not self._stopping:
            try:
                await lane.worker.wait_ready()
                if await self._run_next_in(lane) is None:
                    if lane is self.lanes[0]:
                        await self.prefill.queue_empty()
                    await self._idle(lane)
                else:
                    self.prefill.work_ran()
                    self.wake()  # a job may have gone back to the queue (a training slice, a dead worker's job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end the queue for good
                log.exception("the dispatcher loop of lane %s failed; retrying in %.0f s", lane.label, self.poll_s)
                await asyncio.sleep(self.poll_s)

    async def _idle(self, lane: Lane) -> None:
        lane.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.wake.wait(), self.poll_s)

    async def run_next(self) -> Job | None:
        """Claim the next job in fair order and run it to its end in the first lane (see Runner.run_next); None when
        nothing is queued (or the queue is paused)."""
        return await self._run_next_in(self.lanes[0])

    async def _run_next_in(self, lane: Lane) -> Job | None:
        lane.busy = True
        try:
            return await lane.runner.run_next()
        finally:
            lane.busy = False

    async def _claim_for(self, lane: Lane, kinds) -> Job | None:
        """The lane's next job. With other lanes free too, each of the first few jobs in fair order starts now
        whichever lane takes it, so this lane takes the one whose LoRAs it holds (bot/dispatch/affinity.py)."""
        free_others = sum(1 for other in self.lanes if other is not lane and other.can_take_work)
        if free_others == 0:
            return await self.ledger.claim_next(kinds)
        return await self.ledger.claim_preferred(lane.runner.affinity.score, 1 + free_others, kinds)

    async def worker_params(self, job: Job) -> dict:
        """What the worker gets for `job` if it ran now (bot/jobs/kinds.py)."""
        return await self.runner.worker_params(job)

    async def deliver_backlog(self) -> int:
        return await self.announcer.deliver_backlog()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
