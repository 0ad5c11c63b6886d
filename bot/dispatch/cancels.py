"""Cancel requests recorded in the ledger (by a member or an admin), passed on to the worker running the job."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from bot.dispatch.worker_api import GpuWorker
from bot.jobs.ledger import Ledger

log = logging.getLogger("boothbot.dispatcher")

CANCEL_POLL_S = 0.5


@contextlib.asynccontextmanager
async def passing_on_cancels(ledger: Ledger, worker: GpuWorker, job_ids: list[int]):
    """While the block runs (the jobs' run on the worker), pass their cancel requests on to the worker."""
    watcher = asyncio.create_task(pass_on_cancels(ledger, worker, job_ids), name=f"cancel-watch-{job_ids[0]}")
    try:
        yield
    finally:
        watcher.cancel()


async def pass_on_cancels(ledger: Ledger, worker: GpuWorker, job_ids: list[int]) -> None:
    waiting = list(job_ids)
    while waiting:
        await asyncio.sleep(CANCEL_POLL_S)
        for job_id in list(waiting):
            if await ledger.cancel_requested(job_id):
                log.info("cancelling job %s at its next step", job_id)
                await worker.cancel(job_id)
                waiting.remove(job_id)
