"""Reading the queue never takes (or waits for) SQLite's write lock, and the queue is read once per change of the
database, not once per view (bot/jobs/queue_cache.py, Store.read)."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bot.jobs.ledger import Ledger
from bot.store.database import Store

HANG_GUARD_S = 20.0  # only so that a regression fails instead of hanging; nothing here is timed


@pytest.fixture
async def quick_store(settings):
    """A Store whose writes give up after 1 s of waiting for the write lock (so a regression fails fast)."""
    store = await Store.open(settings.db_path, busy_timeout_s=1.0)
    yield store
    await store.close()


@pytest.fixture
def write_lock_holder(settings, quick_store):
    """Another connection (as another process would have) inside BEGIN IMMEDIATE: it holds the write lock."""
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    holder = {"conn": conn}

    def take():
        conn.execute("BEGIN IMMEDIATE")
    holder["take"] = take
    yield holder
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


async def test_queue_views_answer_while_another_connection_holds_the_write_lock(quick_store, clock, settings,
                                                                                write_lock_holder):
    ledger = Ledger(quick_store, clock, settings=settings)
    first = await ledger.submit("imagine", 1, 10, 20, {"prompt": "a"})
    second = await ledger.submit("imagine", 2, 10, 20, {"prompt": "b"})
    write_lock_holder["take"]()

    view = await asyncio.wait_for(ledger.queue_view(10), HANG_GUARD_S)
    assert [(e.job.id, e.position) for e in view] == [(first.id, 1), (second.id, 2)]
    assert await asyncio.wait_for(ledger.position(second.id), HANG_GUARD_S) == 2
    assert await asyncio.wait_for(ledger.eta_s(second.id), HANG_GUARD_S) > 0
    assert (await asyncio.wait_for(ledger.get(first.id), HANG_GUARD_S)).status == "queued"
    # The limits check before a submission reads too; the submission itself is a write and has to wait its turn.
    await asyncio.wait_for(ledger.check_submit("imagine", 3, 10), HANG_GUARD_S)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await ledger.submit("imagine", 3, 10, 20, {"prompt": "c"})


async def test_a_view_sees_what_another_connection_committed(ledger, other_ledger):
    job = await ledger.submit("imagine", 1, 10, 20, {"prompt": "a"})
    assert await ledger.position(job.id) == 1
    assert await other_ledger.cancel(job.id, 1) == "cancelled"  # committed by another connection
    assert await ledger.position(job.id) is None
    assert await ledger.queue_view() == []


async def test_the_queue_is_read_once_per_change_however_many_views(ledger):
    jobs = [await ledger.submit("imagine", owner, 10, 20, {"prompt": str(owner)}) for owner in range(1, 6)]
    before = ledger.queue.worked_out
    for job in jobs:  # what each job's status message asks, then /queue show and /queue admin list
        await ledger.position(job.id)
        await ledger.eta_s(job.id)
    await ledger.queue_view(10)
    await ledger.queue_view()
    assert ledger.queue.worked_out == before + 1

    await ledger.cancel(jobs[0].id, 1)  # a change: the next view reads the queue again, and only once
    assert [e.job.id for e in await ledger.queue_view()] == [j.id for j in jobs[1:]]
    assert await ledger.position(jobs[1].id) == 1
    assert ledger.queue.worked_out == before + 2


async def test_views_that_arrive_together_share_one_reading_of_the_queue(ledger):
    jobs = [await ledger.submit("imagine", owner, 10, 20, {"prompt": str(owner)}) for owner in range(1, 4)]
    before = ledger.queue.worked_out
    positions = await asyncio.gather(*(ledger.position(job.id) for job in jobs for _ in range(10)))
    assert sorted(set(positions)) == [1, 2, 3]
    assert ledger.queue.worked_out == before + 1


async def test_etas_count_down_with_the_clock_only_while_something_runs(ledger, clock):
    waiting = await ledger.submit("imagine", 1, 10, 20, {"prompt": "a"})
    eta = await ledger.eta_s(waiting.id)
    clock.advance(1.0)
    assert await ledger.eta_s(waiting.id) == eta  # nothing runs: the queue does not move

    running = await ledger.submit("imagine", 2, 10, 20, {"prompt": "b"})
    await ledger.claim(running.id)
    before = {e.job.id: e.eta_s for e in await ledger.queue_view()}
    clock.advance(1.0)
    after = {e.job.id: e.eta_s for e in await ledger.queue_view()}
    assert after == pytest.approx({job_id: eta_s - 1.0 for job_id, eta_s in before.items()})
