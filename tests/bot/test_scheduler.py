"""Fair order, priority, pause, limits and bans at submit, queue position and ETA."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bot.errors import BannedError, LimitError
from bot.jobs.scheduler import default_duration_s

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 333333333333333333
ALICE, BOB, CAROL, ADMIN = 1001, 1002, 1003, 9009
ROLE_PATRON = 444444444444444444


@pytest.fixture
def settings(settings):
    return replace(settings, max_queued_jobs=50)


async def run_next(ledger, clock, seconds: float):
    """What the dispatcher does: claim, spend `seconds` of GPU, finish."""
    job = await ledger.claim_next()
    if job is not None:
        clock.advance(seconds)
        assert await ledger.succeed(job.id, {}, gpu_seconds=seconds)
    return job


async def test_a_member_with_one_job_is_not_starved_by_one_with_twenty(ledger, clock):
    alice = [await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {"n": i}) for i in range(20)]
    clock.advance(1)
    bob = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert await ledger.position(bob.id) == 2  # behind Alice's first job only, not her twenty

    order = [(await run_next(ledger, clock, 10.0)).owner_id for _ in range(3)]
    assert order == [ALICE, BOB, ALICE]
    assert (await ledger.get(bob.id)).status == "succeeded"

    # Carol arrives late with two jobs; Alice has used 20 s: both of Carol's (0 s, then 10 s) go first
    carol = [await ledger.submit("imagine", CAROL, GUILD, CHANNEL, {}) for _ in range(2)]
    assert [await ledger.position(job.id) for job in carol] == [1, 2]
    order = [(await run_next(ledger, clock, 10.0)).owner_id for _ in range(4)]
    assert order == [CAROL, CAROL, ALICE, ALICE]
    assert [(await ledger.get(job.id)).status for job in alice[:4]] == ["succeeded"] * 4


async def test_fair_share_alternates_between_two_busy_members(ledger, clock):
    for i in range(5):
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    for i in range(5):
        await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    owners = [(await run_next(ledger, clock, 10.0)).owner_id for _ in range(10)]
    assert owners == [ALICE, BOB] * 5


async def test_gpu_time_counts_within_the_window_only(ledger, clock, settings):
    await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await run_next(ledger, clock, 3000.0)  # Alice trained a lot...
    alice = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    clock.advance(1)
    bob = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert [e.job.id for e in await ledger.queue_view()] == [bob.id, alice.id]
    clock.advance(settings.fair_window_hours * 3600 + 1)  # ...but that is now outside the window
    assert [e.job.id for e in await ledger.queue_view()] == [alice.id, bob.id]  # equal usage: the older first
    assert (await ledger.claim_next()).id == alice.id


async def test_a_running_job_counts_against_its_owner(ledger, clock):
    first = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim_next()
    clock.advance(60)  # still running, no gpu_seconds recorded yet
    alice_next = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    clock.advance(1)
    bob = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert (await ledger.claim_next()).id == bob.id
    assert first.id != alice_next.id


async def test_bump_orders_ties_and_a_members_own_jobs(ledger, admin, clock):
    a1 = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    a2 = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    b1 = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert (await admin.bump(b1.id, ADMIN)).priority == 1  # equal usage: priority decides before age
    assert (await admin.bump(a2.id, ADMIN, 2)).priority == 2
    assert [e.job.id for e in await ledger.queue_view()] == [a2.id, b1.id, a1.id]
    assert (await ledger.claim_next()).id == a2.id


async def test_bump_does_not_beat_lower_usage(ledger, admin, clock):
    await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await run_next(ledger, clock, 30.0)
    bumped = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await admin.bump(bumped.id, ADMIN, 10)
    bob = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert (await ledger.claim_next()).id == bob.id


async def test_pause_stops_claims_until_resumed(ledger, admin):
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    assert await admin.pause(ADMIN)
    assert not await admin.pause(ADMIN)  # already paused
    assert await admin.is_paused()
    assert await ledger.claim_next() is None
    assert await ledger.claim(job.id) is None
    await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})  # submitting still works
    assert await admin.resume(ADMIN)
    assert (await ledger.claim_next()).id == job.id


async def test_claim_next_filters_kinds(ledger):
    train = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    imagine = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert (await ledger.claim_next(kinds=("imagine",))).id == imagine.id
    assert await ledger.claim_next(kinds=("imagine",)) is None
    assert (await ledger.claim_next()).id == train.id


async def test_queued_job_limit_with_a_clear_message(ledger, admin, settings):
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 3)
    jobs = [await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}) for _ in range(3)]
    with pytest.raises(LimitError, match=r"You already have 3 jobs waiting or running.*cancel one with /queue"):
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    with pytest.raises(LimitError):
        await ledger.check_submit("imagine", ALICE, GUILD)
    await ledger.submit("imagine", ALICE, OTHER_GUILD, CHANNEL, {})  # another server has its own count
    await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    await ledger.claim(jobs[0].id)
    with pytest.raises(LimitError):  # running still counts
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await ledger.succeed(jobs[0].id, {}, 1.0)
    await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})


async def test_role_limits_take_the_most_generous(ledger, admin, settings):
    assert await admin.limits_for(GUILD) == {"max_queued_jobs": 50, "trainings_per_day": 2}
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 1)
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 4, role_id=ROLE_PATRON)
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 2, role_id=555)
    assert (await admin.limits_for(GUILD))["max_queued_jobs"] == 1
    assert (await admin.limits_for(GUILD, [555, ROLE_PATRON]))["max_queued_jobs"] == 4
    assert (await admin.limits_for(OTHER_GUILD, [ROLE_PATRON]))["max_queued_jobs"] == 50
    for _ in range(4):
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}, role_ids=[ROLE_PATRON])
    with pytest.raises(LimitError, match="4 jobs"):
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}, role_ids=[ROLE_PATRON])
    await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    with pytest.raises(LimitError, match="1 job waiting"):
        await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", None)  # back to the default
    assert (await admin.limits_for(GUILD))["max_queued_jobs"] == 50
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 0)
    with pytest.raises(LimitError, match="does not accept new jobs"):
        await ledger.submit("imagine", CAROL, GUILD, CHANNEL, {})


async def test_trainings_per_day(ledger, clock):
    first = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    clock.advance(3600)
    await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    cancelled_early = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})  # imagine never counts
    await ledger.cancel(cancelled_early.id, ALICE)
    with pytest.raises(LimitError, match=r"already started 2 trainings in the last 24 hours.*train again in about 23 h"):
        await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.cancel(first.id, ALICE)  # cancelled before it started: does not count
    third = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(third.id)
    await ledger.cancel(third.id, ALICE)
    await ledger.confirm_cancelled(third.id)  # it had used the GPU: counts
    with pytest.raises(LimitError):
        await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    clock.advance(24 * 3600)
    await ledger.submit("train", ALICE, GUILD, CHANNEL, {})


async def test_training_can_be_turned_off(ledger, admin):
    await admin.set_limit(ADMIN, GUILD, "trainings_per_day", 0)
    with pytest.raises(LimitError, match="Training is turned off"):
        await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})


async def test_bans_block_submits_on_that_server_only(ledger, admin):
    await admin.ban(ADMIN, GUILD, ALICE, reason="spam")
    with pytest.raises(BannedError, match=r"blocked you from using the bot \(reason: spam\)"):
        await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    with pytest.raises(BannedError):
        await ledger.check_submit("train", ALICE, GUILD)
    await ledger.submit("imagine", ALICE, OTHER_GUILD, CHANNEL, {})
    assert await admin.unban(ADMIN, GUILD, ALICE)
    assert not await admin.unban(ADMIN, GUILD, ALICE)
    await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})


async def test_position_and_eta_from_defaults_then_measurements(ledger, clock):
    train = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    img = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert await ledger.position(train.id) == 1 and await ledger.position(img.id) == 2
    assert await ledger.eta_s(train.id) == default_duration_s("train")
    assert await ledger.eta_s(img.id) == default_duration_s("train") + default_duration_s("imagine")

    # measured: imagine jobs took 4, 6 and 100 s (median 6); a training took 120 s
    for seconds in (4.0, 6.0, 100.0):
        await ledger.submit("imagine", CAROL, OTHER_GUILD, CHANNEL, {})
    await ledger.cancel(train.id, ALICE)
    await ledger.cancel(img.id, BOB)
    for seconds in (4.0, 6.0, 100.0):
        await run_next(ledger, clock, seconds)
    await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await run_next(ledger, clock, 120.0)

    running = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(running.id)
    clock.advance(20)
    waiting = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    assert await ledger.position(running.id) is None
    assert await ledger.eta_s(running.id) == pytest.approx(100.0)  # 120 expected, 20 done
    assert await ledger.position(waiting.id) == 1
    assert await ledger.eta_s(waiting.id) == pytest.approx(100.0 + 6.0)
    await ledger.record_progress(running.id, 50, 100, eta_s=30.0)  # the worker's own estimate wins
    assert await ledger.eta_s(waiting.id) == pytest.approx(36.0)
    view = await ledger.queue_view(guild_id=OTHER_GUILD)
    assert view == []
    await ledger.succeed(running.id, {}, 50.0)
    assert await ledger.eta_s(running.id) is None and await ledger.position(running.id) is None


async def test_eta_behind_a_running_batch_waits_for_its_longest_job_not_the_sum(ledger, clock):
    batch = [await ledger.submit("imagine", member, GUILD, CHANNEL, {}) for member in (ALICE, BOB, CAROL)]
    waiting = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    claimed = await ledger.claim_matching(lambda job, taken: job.id != waiting.id, 3)
    assert sorted(j.id for j in claimed) == sorted(j.id for j in batch)
    await ledger.record_progress(batch[0].id, 5, 30, eta_s=4.0)
    await ledger.record_progress(batch[1].id, 5, 30, eta_s=9.0)
    await ledger.record_progress(batch[2].id, 5, 30, eta_s=4.0)
    assert await ledger.position(waiting.id) == 1
    assert await ledger.eta_s(waiting.id) == pytest.approx(9.0 + default_duration_s("imagine"))


async def test_position_simulates_fairness_for_many_members(ledger, clock):
    alice = [await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}) for _ in range(6)]
    bob = [await ledger.submit("imagine", BOB, GUILD, CHANNEL, {}) for _ in range(2)]
    carol = await ledger.submit("imagine", CAROL, GUILD, CHANNEL, {})
    view = await ledger.queue_view()
    owners = [e.job.owner_id for e in view]
    assert owners == [ALICE, BOB, CAROL, ALICE, BOB, ALICE, ALICE, ALICE, ALICE]
    assert [e.position for e in view] == list(range(1, 10))
    assert await ledger.position(carol.id) == 3
    # and the real run follows the simulated order
    ran = [(await run_next(ledger, clock, default_duration_s("imagine"))).id for _ in range(9)]
    assert ran == [e.job.id for e in view]
    assert {j.id for j in alice + bob} < set(ran)
