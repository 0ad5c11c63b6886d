"""A training pauses only when someone waits: while a resumable job (a training) runs on the worker, the first queued
job that may run between its slices (an /imagine) makes the runner ask the worker to yield it at its next step
boundary. The training then ends its run with `paused` and the runner lets the waiting jobs run before claiming it
again (runner.py). The check runs when a job is submitted (the dispatcher's wake) and every `poll_s` besides
(jobs queued another way: a restart's backlog, a requeue). Nothing is asked while the queue is paused, nor while
another lane is free to take the waiting job (`other_lane_free`, set by the dispatcher)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from bot.dispatch.worker_api import GpuWorker
from bot.jobs import scheduler
from bot.jobs.kinds import between_slices, kind_of
from bot.jobs.ledger import Job, Ledger

log = logging.getLogger("boothbot.dispatcher")

YIELD_POLL_S = 0.5


class YieldOnDemand:
    def __init__(self, ledger: Ledger, worker: GpuWorker, poll_s: float = YIELD_POLL_S):
        self.ledger = ledger
        self.worker = worker
        self.poll_s = poll_s
        self.requested = 0  # yields asked for (logs, tests)
        self.other_lane_free: Callable[[], bool] = lambda: False
        self._running: int | None = None
        self._nudge = asyncio.Event()

    def job_queued(self) -> None:
        """A job was submitted: look now rather than at the next poll."""
        self._nudge.set()

    @contextlib.asynccontextmanager
    async def while_running(self, job: Job):
        """Around one run of `job` on the worker: ask it to yield once someone waits (resumable kinds only)."""
        if not kind_of(job.kind).resumable:
            yield
            return
        self._running = job.id
        watcher = asyncio.create_task(self._watch(job.id), name=f"yield-watch-{job.id}")
        try:
            yield
        finally:
            self._running = None
            watcher.cancel()

    async def now(self) -> None:
        """Yield the running training at once (the bot is shutting down: it checkpoints and ends its run)."""
        if self._running is not None:
            await self.worker.request_yield(self._running)

    async def _watch(self, job_id: int) -> None:
        while True:
            self._nudge.clear()
            if await self._someone_waits():
                log.info("job %s: a job is waiting for the GPU; asking the training to pause at its next step", job_id)
                self.requested += 1
                await self.worker.request_yield(job_id)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.poll_s)

    async def _someone_waits(self) -> bool:
        kinds = between_slices()
        if not kinds or self.other_lane_free():
            return False
        async with self.ledger.store.read() as db:
            if await scheduler.is_paused(db):
                return False  # nothing could run in its place
            return bool(await db.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND kind IN ({','.join('?' * len(kinds))}))",
                kinds))
