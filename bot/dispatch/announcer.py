"""Hands jobs to the notifier (the Discord delivery cog, or the log): their progress, and each finished job's outcome
through the delivery outbox (bot/dispatch/outbox.py), which retries until the notifier confirms it.

A notifier's `job_finished` delivers the outcome and calls `ledger.mark_delivered` only once the outcome is out
(every part confirmed); it raises `RetryLater` when a later attempt may work. Jobs that finished while no notifier
was attached (or before a restart) are announced by `deliver_backlog` when one is.
"""
from __future__ import annotations

import logging
from typing import Protocol

from bot.dispatch.outbox import Outbox, RetryLater
from bot.jobs.ledger import Job, Ledger

__all__ = ["Announcer", "LogNotifier", "Notifier", "RetryLater"]

log = logging.getLogger("boothbot.dispatcher")


class Notifier(Protocol):
    async def job_progress(self, job: Job, event: dict) -> None: ...

    async def job_finished(self, job: Job) -> None: ...


class LogNotifier:
    """Announces finished jobs in the log only (`python -m bot run --no-discord`): delivered via "log"."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def job_progress(self, job: Job, event: dict) -> None:
        pass

    async def job_finished(self, job: Job) -> None:
        outcome = job.error or ", ".join(f"{k}={v}" for k, v in (job.result or {}).items() if k != "parameters")
        # Logged, then marked: like every delivery, at least once.
        log.info("delivered job %s (%s, %s): %s", job.id, job.kind, job.status, outcome[:300])
        await self.ledger.mark_delivered(job.id, via="log")


class Announcer:
    def __init__(self, ledger: Ledger, notifier: Notifier | None = None):
        self.ledger = ledger
        self.outbox = Outbox(ledger, notifier)

    @property
    def notifier(self) -> Notifier | None:
        return self.outbox.notifier

    @notifier.setter
    def notifier(self, notifier: Notifier | None) -> None:
        self.outbox.notifier = notifier
        self.outbox.wake()

    async def progress(self, job: Job, event: dict) -> None:
        if self.notifier is None:
            return
        try:
            await self.notifier.job_progress(job, event)
        except Exception:
            log.exception("the notifier failed to show progress of job %s", job.id)

    async def finished(self, job_id: int) -> bool:
        """Deliver a finished job's outcome now; when that fails the outbox retries it. True once delivered."""
        return await self.outbox.deliver(job_id)

    async def deliver_backlog(self) -> int:
        """Announce finished jobs that were never announced (restart, or no notifier then). Returns how many."""
        return await self.outbox.deliver_backlog()
