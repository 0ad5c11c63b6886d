"""The delivery outbox: every finished job is handed to the notifier until it confirms the delivery.

A terminal job with `delivered_at` NULL is an outbox entry (bot/jobs/ledger.py, migration 0002). The notifier
posts the outcome and calls `ledger.mark_delivered` only after Discord confirmed every part; when an attempt fails
for a reason that may pass (Discord's 5xx, a rate limit, the network, no connection) it raises `RetryLater`, and the
outbox records the attempt and tries again after a growing pause. A restart tries every waiting job at once (the
backlog), whenever its next attempt was due. Attempts for one job never overlap: concurrent calls share one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from bot import metrics
from bot.jobs.ledger import Ledger

if TYPE_CHECKING:
    from bot.dispatch.announcer import Notifier

log = logging.getLogger("boothbot.delivery")

FIRST_RETRY_S = 2.0
MAX_RETRY_S = 300.0
IDLE_CHECK_S = 60.0  # a retry loop with nothing to wait for still looks at the ledger this often


class RetryLater(Exception):
    """Raised by a notifier: this attempt failed, but a later one may work (its text is recorded on the job)."""


def retry_in_s(attempts: int) -> float:
    """The pause after the `attempts`-th failed attempt: 2 s, 4 s, 8 s, … up to 5 minutes."""
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempts - 1))


class Outbox:
    def __init__(self, ledger: Ledger, notifier: Notifier | None = None):
        self.ledger = ledger
        self.notifier = notifier
        self._attempts: dict[int, asyncio.Task] = {}  # job id -> the attempt in progress
        self._wake = asyncio.Event()
        self._retrying: asyncio.Task | None = None

    async def deliver(self, job_id: int) -> bool:
        """Try to deliver the job's outcome now (joining an attempt already in progress). True once delivered."""
        attempt = self._attempts.get(job_id)
        if attempt is None:
            attempt = asyncio.ensure_future(self._attempt(job_id))
            self._attempts[job_id] = attempt
            attempt.add_done_callback(lambda _: self._attempts.pop(job_id, None))
        return await attempt

    async def deliver_backlog(self) -> int:
        """Try every finished job that is not delivered yet (at start, or when a notifier is attached), whatever
        its retry time. Returns how many there were."""
        jobs = await self.ledger.undelivered()
        for job in jobs:
            if self.notifier is None:
                break
            await self.deliver(job.id)
        if jobs:
            log.info("tried to announce %d job(s) that had finished without being announced", len(jobs))
        return len(jobs)

    async def _attempt(self, job_id: int) -> bool:
        notifier = self.notifier
        job = await self.ledger.get(job_id)
        if job is None or not job.is_terminal:
            return False
        if job.delivered_at is not None:
            return True
        if notifier is None:
            return False  # delivered by the backlog once a notifier is attached
        try:
            await notifier.job_finished(job)
        except RetryLater as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - a bug must not lose the outcome: logged, then retried like the rest
            log.exception("job %s: the notifier failed to announce it", job_id)
            reason = f"{type(e).__name__}: {e}"
        else:
            current = await self.ledger.get(job_id)
            if current is None or current.delivered_at is not None:
                metrics.delivered(current)
                return current is not None
            reason = "the notifier returned without delivering it"
        attempts = await self.ledger.delivery_failed(job_id, reason, retry_in_s(job.delivery_attempts + 1))
        metrics.delivery_failed_attempt()
        pause = retry_in_s(attempts)
        log.warning("job %s: delivery attempt %d failed (%s); trying again in %.0f s", job_id, attempts, reason,
                    pause)
        self._wake.set()
        return False

    # --- retries ------------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the outbox now (a notifier came or went)."""
        self._wake.set()

    def start(self) -> None:
        """Run the retry loop (while a notifier is attached)."""
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry_loop(), name="delivery-retries")
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._retrying, *self._attempts.values()) if t is not None]
        self._retrying = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _retry_loop(self) -> None:
        while self.notifier is not None:
            self._wake.clear()
            next_at = None
            try:
                for job in await self.ledger.undelivered(due_by=self.ledger.clock()):
                    if self.notifier is None or job.delivery_next_at is None:
                        continue  # never tried yet: its first attempt is the dispatcher's (or the backlog's)
                    await self.deliver(job.id)
                next_at = await self.ledger.next_delivery_at()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not end the retries for good
                log.exception("the delivery retry loop failed; trying again in %.0f s", IDLE_CHECK_S)
            pause = IDLE_CHECK_S if next_at is None else min(IDLE_CHECK_S, max(0.0, next_at - self.ledger.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
