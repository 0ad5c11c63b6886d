"""Ledger: guarded transitions, atomic claims across connections, racing cancels, restart recovery, deliver-once."""
from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace

import pytest

from bot.errors import NotFound, PermissionDenied
from bot.jobs.kinds import IMAGINE_INTERRUPTED
from bot.jobs.ledger import MAX_RECOVERIES, TERMINAL, Ledger
from bot.store.database import Store

GUILD, CHANNEL = 111111111111111111, 333333333333333333
ALICE, BOB = 1001, 1002


@pytest.fixture
def settings(settings):
    return replace(settings, max_queued_jobs=100, trainings_per_day=100)


async def test_submit_records_the_job(ledger, clock):
    job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {"prompt": "a dog", "count": 2},
                              interaction_message_id=555)
    assert (job.kind, job.owner_id, job.guild_id, job.channel_id, job.message_id) == ("imagine", ALICE, GUILD,
                                                                                    CHANNEL, 555)
    assert job.params == {"prompt": "a dog", "count": 2}
    assert (job.status, job.priority, job.attempts, job.gpu_seconds) == ("queued", 0, 0, 0.0)
    assert job.created_at == clock.now and job.started_at is None and not job.is_terminal
    assert await ledger.get(job.id) == job
    await ledger.set_message(job.id, CHANNEL, 777)
    assert (await ledger.get(job.id)).message_id == 777
    with pytest.raises(ValueError, match="unknown job kind"):
        await ledger.submit("upscale", ALICE, GUILD, CHANNEL, {})


async def test_claim_succeed_and_terminal_is_final(ledger, store, clock):
    job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    clock.advance(5)
    claimed = await ledger.claim_next()
    assert claimed.id == job.id and claimed.status == "running" and claimed.started_at == clock.now
    assert await ledger.claim_next() is None
    assert await ledger.record_progress(job.id, 3, 10, eta_s=7.0, preview="/p.webp")
    clock.advance(10)
    assert await ledger.succeed(job.id, {"images": ["a.png"]}, gpu_seconds=9.5)
    done = await ledger.get(job.id)
    assert (done.status, done.result, done.gpu_seconds, done.finished_at) == ("succeeded", {"images": ["a.png"]},
                                                                              9.5, clock.now)
    assert (done.progress_step, done.progress_total, done.preview) == (3, 10, "/p.webp")

    # nothing moves a finished job
    assert not await ledger.succeed(job.id, {"images": []}, 1.0)
    assert not await ledger.fail(job.id, "late failure")
    assert not await ledger.confirm_cancelled(job.id)
    assert not await ledger.requeue(job.id)
    assert not await ledger.record_progress(job.id, 4, 10)
    assert await ledger.claim(job.id) is None
    assert await ledger.cancel(job.id, ALICE) == "already finished"
    assert await ledger.get(job.id) == done
    # and the schema refuses it even to hand-written SQL
    with pytest.raises(sqlite3.IntegrityError, match="job is finished"):
        await store.execute("UPDATE jobs SET status = 'queued' WHERE id = ?", (job.id,))


async def test_fail_from_running_only(ledger):
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    assert not await ledger.fail(job.id, "not running yet")
    await ledger.claim(job.id)
    assert await ledger.fail(job.id, "The GPU ran out of memory.", gpu_seconds=2.0)
    failed = await ledger.get(job.id)
    assert (failed.status, failed.error, failed.gpu_seconds) == ("failed", "The GPU ran out of memory.", 2.0)


async def test_training_slices_requeue_and_add_up(ledger):
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": 1})
    first = await ledger.claim_next()
    await ledger.record_progress(job.id, 100, 400)
    assert await ledger.requeue(job.id, gpu_seconds=10.0)
    between = await ledger.get(job.id)
    assert (between.status, between.gpu_seconds, between.progress_step, between.attempts) == ("queued", 10.0, 100, 0)
    again = await ledger.claim(job.id)
    assert again.status == "running" and again.started_at == first.started_at
    assert await ledger.succeed(job.id, {"lora": "x"}, gpu_seconds=10.0)
    assert (await ledger.get(job.id)).gpu_seconds == 20.0


async def test_cancel_queued_running_and_permissions(ledger):
    queued = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    running = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(running.id)

    with pytest.raises(PermissionDenied, match="not yours"):
        await ledger.cancel(queued.id, BOB)
    with pytest.raises(NotFound, match="no job #999"):
        await ledger.cancel(999, ALICE)

    assert await ledger.cancel(queued.id, ALICE) == "cancelled"
    cancelled = await ledger.get(queued.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_by == ALICE and cancelled.finished_at

    assert not await ledger.cancel_requested(running.id)
    assert await ledger.cancel(running.id, BOB, force=True) == "requested"
    assert await ledger.cancel(running.id, ALICE) == "already requested"
    assert await ledger.cancel_requested(running.id)
    assert (await ledger.get(running.id)).status == "running"  # stops at the next step boundary
    assert await ledger.confirm_cancelled(running.id, gpu_seconds=3.0)
    assert (await ledger.get(running.id)).status == "cancelled"


async def test_a_slice_ending_after_a_cancel_request_ends_the_job(ledger):
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(job.id)
    assert await ledger.cancel(job.id, ALICE) == "requested"
    assert not await ledger.requeue(job.id, gpu_seconds=5.0)
    ended = await ledger.get(job.id)
    assert ended.status == "cancelled" and ended.gpu_seconds == 5.0


async def test_concurrent_claims_from_two_stores_take_each_job_once(ledger, other_ledger):
    jobs = [await ledger.submit("imagine", 2000 + i % 7, GUILD, CHANNEL, {"n": i}) for i in range(60)]
    claimed: list[int] = []

    async def claimer(led: Ledger):
        while (job := await led.claim_next()) is not None:
            claimed.append(job.id)
            await asyncio.sleep(0)

    await asyncio.gather(*(claimer(led) for led in [ledger, other_ledger] * 10))
    assert sorted(claimed) == [job.id for job in jobs]  # every job, exactly once
    assert {job.status for job in await ledger.list_jobs(limit=100)} == {"running"}


async def test_racing_cancels_exactly_one_wins(ledger, other_ledger):
    queued = [await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}) for _ in range(20)]
    for job in queued:
        answers = await asyncio.gather(ledger.cancel(job.id, ALICE), other_ledger.cancel(job.id, ALICE))
        assert sorted(answers) == ["already finished", "cancelled"]

    running = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(running.id)
    answers = await asyncio.gather(ledger.cancel(running.id, ALICE), other_ledger.cancel(running.id, ALICE))
    assert sorted(answers) == ["already requested", "requested"]


async def test_cancel_racing_a_claim_leaves_one_consistent_outcome(ledger, other_ledger):
    for _ in range(20):
        job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
        claimed, answer = await asyncio.gather(other_ledger.claim(job.id), ledger.cancel(job.id, ALICE))
        final = await ledger.get(job.id)
        if answer == "cancelled":
            assert claimed is None and final.status == "cancelled"
        else:
            assert answer == "requested" and claimed is not None
            assert final.status == "running" and final.cancel_requested
            await ledger.confirm_cancelled(job.id)


async def test_recovery_after_restart(settings, clock):
    """Jobs left running by a dead bot: training back to the queue, /imagine interrupted, finished ones delivered."""
    store = await Store.open(settings.db_path)
    ledger = Ledger(store, clock, settings=settings)
    train = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": 1})
    imagine = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {"prompt": "x"})
    worn_out = await ledger.submit("train", BOB, GUILD, CHANNEL, {"concept_id": 2})
    asked_to_stop = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    finished = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    delivered = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    waiting = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    for job in (train, imagine, worn_out, asked_to_stop, finished, delivered):
        assert await ledger.claim(job.id)
    await store.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (MAX_RECOVERIES, worn_out.id))
    await ledger.cancel(asked_to_stop.id, ALICE)
    await ledger.succeed(finished.id, {"images": []}, 1.0)
    await ledger.succeed(delivered.id, {"images": []}, 1.0)
    assert await ledger.mark_delivered(delivered.id)
    await store.close()  # the process dies here; nothing else is written

    store = await Store.open(settings.db_path)
    ledger = Ledger(store, clock, settings=settings)
    try:
        recovered = {job.id: job for job in await ledger.recover_at_start()}
        assert set(recovered) == {train.id, imagine.id, worn_out.id, asked_to_stop.id}
        assert (recovered[train.id].status, recovered[train.id].attempts) == ("queued", 1)
        assert recovered[imagine.id].status == "interrupted"
        assert recovered[imagine.id].error == IMAGINE_INTERRUPTED
        assert "restarted during this training" in recovered[worn_out.id].error
        assert recovered[worn_out.id].status == "interrupted"
        assert recovered[asked_to_stop.id].status == "cancelled"
        assert (await ledger.get(waiting.id)).status == "queued"
        assert await ledger.recover_at_start() == []  # nothing is left running

        undelivered = [job.id for job in await ledger.undelivered()]
        assert sorted(undelivered) == sorted([imagine.id, worn_out.id, asked_to_stop.id, finished.id])
        assert (await ledger.claim_next()).id == train.id  # training resumes from its checkpoint
    finally:
        await store.close()


async def test_delivered_exactly_once_when_deliverers_race(ledger, other_ledger):
    jobs = []
    for _ in range(15):
        job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
        await ledger.claim(job.id)
        await ledger.succeed(job.id, {}, 1.0)
        jobs.append(job)
    for job in jobs:
        wins = await asyncio.gather(*(led.mark_delivered(job.id) for led in [ledger, other_ledger] * 3))
        assert wins.count(True) == 1
    assert await ledger.undelivered() == []


async def test_unfinished_jobs_are_not_delivered(ledger):
    job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    assert not await ledger.mark_delivered(job.id)
    await ledger.claim(job.id)
    assert not await ledger.mark_delivered(job.id)
    assert await ledger.undelivered() == []


async def test_list_jobs_filters_newest_first(ledger):
    a1 = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    b1 = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    a2 = await ledger.submit("train", ALICE, 222222222222222222, CHANNEL, {})
    await ledger.claim(a1.id)
    assert [j.id for j in await ledger.list_jobs()] == [a2.id, b1.id, a1.id]
    assert [j.id for j in await ledger.list_jobs(owner_id=ALICE)] == [a2.id, a1.id]
    assert [j.id for j in await ledger.list_jobs(guild_id=GUILD, statuses=["queued"])] == [b1.id]
    assert [j.id for j in await ledger.list_jobs(limit=1)] == [a2.id]
    assert TERMINAL == {"succeeded", "failed", "cancelled", "interrupted"}
