"""The delivery outbox against a real SQLite ledger: delivered only when the notifier confirms, retried after
failures with growing pauses, one attempt at a time per job, and read back from the database as documented."""
from __future__ import annotations

import asyncio

from bot.dispatch import outbox
from bot.dispatch.announcer import LogNotifier
from bot.dispatch.outbox import Outbox, RetryLater


class FlakyNotifier:
    """Fails the first `failures` attempts with RetryLater, then delivers (marking the job delivered)."""

    def __init__(self, ledger, failures: int = 0, *, delay: float = 0.0):
        self.ledger, self.failures, self.delay = ledger, failures, delay
        self.attempts: list[int] = []

    async def job_progress(self, job, event):
        pass

    async def job_finished(self, job):
        self.attempts.append(job.id)
        await asyncio.sleep(self.delay)
        if len(self.attempts) <= self.failures:
            raise RetryLater("503 Service Unavailable")
        await self.ledger.confirm_part(job.id, "channel", 0, 1000 + job.id)
        await self.ledger.mark_delivered(job.id)


async def finished_job(ledger):
    job = await ledger.submit("imagine", 7, 1, 5, {"prompt": "a cat"})
    await ledger.claim_next()
    assert await ledger.succeed(job.id, {"images": []}, 1.0)
    return job.id


def test_pauses_grow_and_are_capped():
    assert [outbox.retry_in_s(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert outbox.retry_in_s(50) == outbox.MAX_RETRY_S


async def test_a_failed_attempt_is_recorded_and_retried_until_delivered(ledger, clock, monkeypatch):
    monkeypatch.setattr(outbox, "FIRST_RETRY_S", 0.0)  # the test's clock does not move: retry at once
    job_id = await finished_job(ledger)
    notifier = FlakyNotifier(ledger, failures=2)
    box = Outbox(ledger, notifier)

    assert not await box.deliver(job_id)
    waiting = await ledger.get(job_id)
    assert waiting.delivered_at is None and waiting.delivery_attempts == 1
    assert waiting.delivery_error == "503 Service Unavailable" and waiting.delivery_next_at == clock.now
    assert [j.id for j in await ledger.undelivered(due_by=clock.now)] == [job_id]

    box.start()
    try:
        for _ in range(100):
            if (await ledger.get(job_id)).delivered_at is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        await box.stop()
    delivered = await ledger.get(job_id)
    assert delivered.delivered_via == "channel" and delivered.delivery_attempts == 2
    assert delivered.delivery_error is None and delivered.delivery_next_at is None
    assert notifier.attempts == [job_id] * 3
    assert await ledger.confirmed_parts(job_id, "channel") == {0: 1000 + job_id}
    assert await ledger.undelivered() == []


async def test_a_retry_waits_for_its_time(ledger, clock):
    job_id = await finished_job(ledger)
    assert not await Outbox(ledger, FlakyNotifier(ledger, failures=5)).deliver(job_id)
    assert await ledger.undelivered(due_by=clock.now) == []
    assert await ledger.next_delivery_at() == clock.now + outbox.FIRST_RETRY_S
    assert [j.id for j in await ledger.undelivered(due_by=clock.advance(outbox.FIRST_RETRY_S))] == [job_id]


async def test_calls_at_the_same_time_share_one_attempt(ledger):
    job_id = await finished_job(ledger)
    notifier = FlakyNotifier(ledger, delay=0.2)
    box = Outbox(ledger, notifier)
    assert await asyncio.gather(*(box.deliver(job_id) for _ in range(3))) == [True] * 3
    assert await box.deliver(job_id) and notifier.attempts == [job_id]


async def test_a_notifier_that_returns_without_delivering_counts_as_a_failed_attempt(ledger):
    job_id = await finished_job(ledger)

    class Forgetful(FlakyNotifier):
        async def job_finished(self, job):
            self.attempts.append(job.id)

    assert not await Outbox(ledger, Forgetful(ledger)).deliver(job_id)
    job = await ledger.get(job_id)
    assert job.delivery_attempts == 1 and job.delivery_next_at is not None  # no busy loop on it


async def test_the_log_notifier_marks_jobs_delivered_via_the_log(ledger):
    job_id = await finished_job(ledger)
    assert await Outbox(ledger, LogNotifier(ledger)).deliver(job_id)
    assert (await ledger.get(job_id)).delivered_via == "log"


async def test_admins_see_outcomes_that_went_elsewhere_or_wait(ledger):
    by_dm, waiting, fine = [await finished_job(ledger) for _ in range(3)]
    assert await ledger.mark_delivered(by_dm, "dm", "its channel refused the outcome (403 Missing Access)")
    await ledger.delivery_failed(waiting, "503 Service Unavailable", 60)
    assert await ledger.mark_delivered(fine)
    problems = {job.id: job for job in await ledger.delivery_problems(guild_id=1)}
    assert set(problems) == {by_dm, waiting}
    assert "403" in problems[by_dm].delivery_error and problems[waiting].delivered_at is None
