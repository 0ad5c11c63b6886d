"""Submissions run side by side: queueing a job and answering the member never wait for another job's status
message (a post to a channel, which Discord takes only a few times a second) nor for each other."""
from __future__ import annotations

import asyncio

import pytest

from bot.app import Services
from bot.dispatch.dispatcher import Dispatcher
from bot.dispatch.worker_client import WorkerClient
from bot.services.submissions import submit_imagine

GUILD, CHANNEL = 111111111111111111, 5
HANG_GUARD_S = 20.0  # only so that a regression fails instead of hanging; nothing here is timed


class HeldStatusMessages:
    """A notifier whose status-message posts hang until released, as posts to a busy channel do."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight: set[int] = set()
        self.posted: list[int] = []
        self.changed = asyncio.Event()

    async def job_queued(self, job) -> None:
        self.in_flight.add(job.id)
        self.changed.set()
        await self.release.wait()
        self.in_flight.discard(job.id)
        self.posted.append(job.id)
        self.changed.set()

    async def job_progress(self, job, event) -> None:
        pass

    async def job_finished(self, job) -> None:
        pass

    async def until(self, predicate) -> None:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), HANG_GUARD_S)


@pytest.fixture
async def services(settings, store, ledger, concepts, gallery, admin):
    worker = WorkerClient.from_settings(settings)  # never started: these jobs only wait in the queue
    services = Services(settings, store, ledger, concepts, gallery, admin, worker,
                        Dispatcher(settings, ledger, concepts, gallery, worker))
    yield services
    await services.stop()


async def imagine(services, member_id: int, prompt: str):
    return await asyncio.wait_for(
        submit_imagine(services, guild_id=GUILD, member_id=member_id, channel_id=CHANNEL, role_ids=(),
                       prompt=prompt), HANG_GUARD_S)


async def test_members_are_answered_while_earlier_status_messages_are_still_being_posted(services):
    notifier = HeldStatusMessages()
    services.set_notifier(notifier)

    first = await imagine(services, 1, "a photo of a dog")
    second = await imagine(services, 2, "a photo of a cat")

    assert first.status == second.status == "queued" and first.id != second.id
    # Both announcements are under way at the same time, neither waiting for the other.
    await notifier.until(lambda: notifier.in_flight == {first.id, second.id})
    notifier.release.set()
    await notifier.until(lambda: sorted(notifier.posted) == [first.id, second.id])


async def test_submissions_sent_together_are_taken_in_together(services):
    notifier = HeldStatusMessages()
    services.set_notifier(notifier)

    jobs = await asyncio.gather(*(imagine(services, member, f"a photo of dog {member}") for member in range(1, 9)))

    assert len({job.id for job in jobs}) == 8
    assert [e.position for e in await services.ledger.queue_view(GUILD)] == list(range(1, 9))
    await notifier.until(lambda: len(notifier.in_flight) == 8)
    notifier.release.set()
    await notifier.until(lambda: len(notifier.posted) == 8)
