"""Hands jobs to the notifier (the Discord delivery cog, or the log): their progress, and each finished job once.

The notifier announces a finished job at most once (`ledger.mark_delivered`); jobs that finished while none was
attached (or before a restart) are announced by `deliver_backlog` when one is.
"""
from __future__ import annotations

import logging
from typing import Protocol

from bot.jobs.ledger import Job, Ledger

log = logging.getLogger("boothbot.dispatcher")


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


class Announcer:
    def __init__(self, ledger: Ledger, notifier: Notifier | None = None):
        self.ledger = ledger
        self.notifier = notifier

    async def progress(self, job: Job, event: dict) -> None:
        if self.notifier is None:
            return
        try:
            await self.notifier.job_progress(job, event)
        except Exception:
            log.exception("the notifier failed to show progress of job %s", job.id)

    async def finished(self, job_id: int) -> None:
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
            await self.finished(job.id)
        if jobs:
            log.info("announced %d job(s) that had finished without being announced", len(jobs))
        return len(jobs)
