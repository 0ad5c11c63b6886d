"""Progress of running jobs: kept in the ledger (for /queue and ETAs) and shown by the notifier."""
from __future__ import annotations

import time

from bot.dispatch.announcer import Announcer
from bot.jobs.ledger import Job, Ledger

WRITE_INTERVAL_S = 1.0  # at most one ledger write per job per interval (and always the last step)


class ProgressRecorder:
    def __init__(self, ledger: Ledger, announcer: Announcer):
        self.ledger = ledger
        self.announcer = announcer
        self._last_write: dict[int, float] = {}

    async def __call__(self, job: Job, event: dict) -> None:
        now = time.monotonic()
        last = self._last_write.get(job.id, 0.0)
        # Class-image events count images, not the job's steps, and their ETA is for the images only: the queue keeps
        # its own estimate for the job until training reports.
        counts_steps = event.get("stage") != "class_images"
        if counts_steps and (now - last >= WRITE_INTERVAL_S or event["step"] == event["total"]):
            self._last_write[job.id] = now
            await self.ledger.record_progress(job.id, event["step"], event["total"], event.get("eta_s"),
                                              event.get("preview"))
        await self.announcer.progress(job, event)

    def forget(self, job_id: int) -> None:
        """The job's run ended (its next slice starts with a fresh write)."""
        self._last_write.pop(job_id, None)
