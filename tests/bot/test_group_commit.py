"""Group commit (bot/store/group_commit.py): submissions that arrive together share one write transaction, yet each
caller gets its own job or its own error, and a member's limits hold inside one group exactly as one by one."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bot.errors import BannedError, LimitError
from bot.store.group_commit import GroupCommit

GUILD, ALICE, BOB, CAROL = 10, 1, 2, 3


async def submit_all(ledger, owners):
    return await asyncio.gather(*(ledger.submit("imagine", owner, GUILD, None, {"prompt": f"p{i}"})
                                  for i, owner in enumerate(owners)), return_exceptions=True)


async def test_a_burst_is_one_group_and_the_queue_limit_holds_inside_it(ledger):
    # settings: max_queued_jobs = 3
    outcomes = await submit_all(ledger, [ALICE] * 5 + [BOB] * 2 + [ALICE])
    assert ledger.submissions.groups_written == 1
    alice = [o for o, owner in zip(outcomes, [ALICE] * 5 + [BOB] * 2 + [ALICE]) if owner == ALICE]
    assert [type(o).__name__ for o in alice] == ["Job"] * 3 + ["LimitError"] * 3
    assert "3 jobs waiting or running" in str(alice[3])
    assert [o.owner_id for o in outcomes[5:7]] == [BOB, BOB]
    queued = await ledger.list_jobs(GUILD, statuses=["queued"])
    assert sorted(job.owner_id for job in queued) == [ALICE] * 3 + [BOB] * 2
    assert len({job.id for job in queued}) == 5


async def test_one_refused_submission_does_not_fail_the_others(ledger, admin):
    await admin.ban(99, GUILD, CAROL, "spam")
    outcomes = await submit_all(ledger, [ALICE, CAROL, BOB])
    assert ledger.submissions.groups_written == 1
    assert outcomes[0].owner_id == ALICE and outcomes[2].owner_id == BOB
    assert isinstance(outcomes[1], BannedError) and "spam" in str(outcomes[1])
    assert {job.owner_id for job in await ledger.list_jobs(GUILD)} == {ALICE, BOB}


async def test_a_failing_write_is_rolled_back_alone(store):
    await store.execute("CREATE TABLE notes (n INTEGER NOT NULL)")

    def write(conn: sqlite3.Connection, n: int) -> int:
        conn.execute("INSERT INTO notes (n) VALUES (?)", (n,))
        if n == 2:
            raise RuntimeError("no twos")  # after its row was written: the savepoint takes it back
        return n * 10

    group = GroupCommit(store, write)
    outcomes = await asyncio.gather(*(group.submit(n) for n in (1, 2, 3)), return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], RuntimeError)
    assert group.groups_written == 1
    assert [row[0] for row in await store.fetchall("SELECT n FROM notes ORDER BY n")] == [1, 3]


async def test_a_caller_cancelled_before_its_group_is_left_out(store):
    await store.execute("CREATE TABLE notes (n INTEGER NOT NULL)")
    group = GroupCommit(store, lambda conn, n: conn.execute("INSERT INTO notes (n) VALUES (?)", (n,)).rowcount)
    locked, release = asyncio.Event(), asyncio.Event()

    async def hold_the_write_lock():  # as a claim would: the group cannot be written meanwhile
        async with store.immediate():
            locked.set()
            await release.wait()
    holder = asyncio.create_task(hold_the_write_lock())
    await locked.wait()
    waiting = [asyncio.create_task(group.submit(n)) for n in (1, 2)]
    await asyncio.sleep(0.05)
    waiting[0].cancel()
    release.set()
    await holder
    assert await waiting[1] == 1
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    assert [row[0] for row in await store.fetchall("SELECT n FROM notes")] == [2]


async def test_submit_inside_an_open_transaction_joins_it(ledger, store):
    with pytest.raises(RuntimeError):
        async with store.immediate():
            job = await ledger.submit("imagine", ALICE, GUILD, None, {"prompt": "inside"})
            assert (await ledger.get(job.id)).status == "queued"  # seen inside the transaction
            raise RuntimeError("the outer work failed")
    assert await ledger.list_jobs(GUILD) == []  # rolled back with it
    async with store.immediate():
        for _ in range(3):
            await ledger.submit("imagine", ALICE, GUILD, None, {"prompt": "inside"})
        with pytest.raises(LimitError):
            await ledger.submit("imagine", ALICE, GUILD, None, {"prompt": "one too many"})
    assert len(await ledger.list_jobs(GUILD)) == 3
