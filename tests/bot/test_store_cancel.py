"""A task cancelled inside a transaction (a throttled edit dropped, a shutdown) leaves its Store usable: aiosqlite
runs a BEGIN it was handed even after the awaiting task is gone, so the transaction must still be ended."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from bot.jobs.ledger import Ledger
from bot.store.database import Store


@pytest.fixture
async def quick_store(settings):
    store = await Store.open(settings.db_path, busy_timeout_s=10.0)
    yield store
    await store.close()


async def test_a_write_cancelled_while_waiting_for_the_write_lock_leaves_the_store_usable(quick_store, clock,
                                                                                         settings):
    ledger = Ledger(quick_store, clock, settings=settings)
    holder = sqlite3.connect(settings.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        waiting = asyncio.create_task(ledger.submit("imagine", 1, 10, 20, {"prompt": "cancelled"}))
        await asyncio.sleep(0)  # it has handed its BEGIN IMMEDIATE to the database thread and waits there
        waiting.cancel()
    finally:
        holder.execute("ROLLBACK")  # the lock is free: that BEGIN now goes through
        holder.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    job = await asyncio.wait_for(ledger.submit("imagine", 2, 10, 20, {"prompt": "next"}), 20)
    assert [j.id for j in await ledger.list_jobs()] == [job.id]  # the cancelled one wrote nothing


async def test_reads_cancelled_at_any_point_leave_the_store_usable(ledger):
    job = await ledger.submit("imagine", 1, 10, 20, {"prompt": "a"})
    for steps in range(8):
        await ledger.submit("imagine", 100 + steps, 10, 20, {"prompt": "a change, so the view reads the queue"})
        view = asyncio.create_task(ledger.queue_view())
        get = asyncio.create_task(ledger.get(job.id))
        for _ in range(steps):
            await asyncio.sleep(0)
        view.cancel()
        get.cancel()
        for task in (view, get):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert (await asyncio.wait_for(ledger.get(job.id), 20)).status == "queued"
        assert await asyncio.wait_for(ledger.position(job.id), 20) == 1
