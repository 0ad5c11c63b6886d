"""Admin services: each action does what it says, stays on its own server, and leaves an audit row."""
from __future__ import annotations

import pytest

from bot.errors import NotFound, UserError

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 333333333333333333
ALICE, BOB, ADMIN, OTHER_ADMIN = 1001, 1002, 9009, 9010


async def test_pause_and_resume_are_global_and_audited(admin, clock):
    assert await admin.pause(ADMIN, guild_id=GUILD)
    clock.advance(1)
    assert not await admin.pause(OTHER_ADMIN, guild_id=OTHER_GUILD)
    clock.advance(1)
    assert await admin.resume(ADMIN)
    rows = await admin.audit(GUILD)
    assert [(r["action"], r["by"], r["guild_id"]) for r in rows] == [
        ("resume", ADMIN, None), ("pause", OTHER_ADMIN, None), ("pause", ADMIN, None)]
    assert rows[1]["detail"] == f"no change; from server {OTHER_GUILD}"
    assert rows[0]["created_at"] == clock.now
    assert set(rows[0]) == {"id", "guild_id", "by", "action", "target", "detail", "created_at"}


async def test_cancel_any_job_on_this_server_only(admin, ledger):
    queued = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    running = await ledger.submit("train", BOB, GUILD, CHANNEL, {})
    elsewhere = await ledger.submit("imagine", ALICE, OTHER_GUILD, CHANNEL, {})
    await ledger.claim(running.id)
    assert await admin.cancel(queued.id, ADMIN, guild_id=GUILD) == "cancelled"
    assert await admin.cancel(running.id, ADMIN, guild_id=GUILD) == "requested"
    assert await admin.cancel(queued.id, ADMIN, guild_id=GUILD) == "already finished"
    with pytest.raises(NotFound, match=f"no job #{elsewhere.id} on this server"):
        await admin.cancel(elsewhere.id, ADMIN, guild_id=GUILD)
    assert (await ledger.get(elsewhere.id)).status == "queued"
    rows = await admin.audit(GUILD)
    assert [(r["action"], r["target"], r["detail"]) for r in rows] == [
        ("cancel", f"job:{queued.id}", "already finished"), ("cancel", f"job:{running.id}", "requested"),
        ("cancel", f"job:{queued.id}", "cancelled")]
    assert await admin.audit(OTHER_GUILD) == []


async def test_bump_only_queued_jobs(admin, ledger):
    job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    assert (await admin.bump(job.id, ADMIN, 3)).priority == 3
    await ledger.claim(job.id)
    with pytest.raises(UserError, match=f"Job #{job.id} is not waiting in the queue"):
        await admin.bump(job.id, ADMIN)
    with pytest.raises(NotFound):
        await admin.bump(job.id, ADMIN, guild_id=OTHER_GUILD)
    (row,) = await admin.audit(GUILD)
    assert (row["action"], row["detail"]) == ("bump", "priority 0 -> 3")


async def test_clear_one_member_or_everyone(admin, ledger):
    for owner in (ALICE, ALICE, BOB):
        await ledger.submit("imagine", owner, GUILD, CHANNEL, {})
    running = await ledger.claim_next()
    other = await ledger.submit("imagine", BOB, OTHER_GUILD, CHANNEL, {})
    assert await admin.clear(ADMIN, GUILD, owner_id=BOB) == (0 if running.owner_id == BOB else 1)
    assert await admin.clear(ADMIN, GUILD) == 1
    assert [j.id for j in await ledger.list_jobs(statuses=["queued", "running"])] == [other.id, running.id]
    assert [(r["action"], r["target"]) for r in await admin.audit(GUILD)] == [("clear", "all"),
                                                                               ("clear", f"member:{BOB}")]


async def test_limits_are_validated_and_audited(admin):
    with pytest.raises(UserError, match="no limit called photos; choose one of: max_queued_jobs, trainings_per_day"):
        await admin.set_limit(ADMIN, GUILD, "photos", 3)
    with pytest.raises(UserError, match="between 0 and 1000; got -1"):
        await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", -1)
    await admin.set_limit(ADMIN, GUILD, "max_queued_jobs", 5)
    await admin.set_limit(ADMIN, GUILD, "trainings_per_day", 7, role_id=444)
    assert await admin.limits(GUILD) == [{"role_id": None, "name": "max_queued_jobs", "value": 5},
                                         {"role_id": 444, "name": "trainings_per_day", "value": 7}]
    assert [(r["target"], r["detail"]) for r in await admin.audit(GUILD)] == [
        ("role:444", "trainings_per_day=7"), ("server", "max_queued_jobs=5")]


async def test_ban_and_unban_are_audited(admin):
    await admin.ban(ADMIN, GUILD, ALICE, reason=" spam ")
    assert await admin.bans(GUILD) == [{"member_id": ALICE, "reason": "spam", "by": ADMIN,
                                        "created_at": (await admin.audit(GUILD))[0]["created_at"]}]
    assert await admin.bans(OTHER_GUILD) == []
    await admin.unban(ADMIN, GUILD, ALICE)
    assert await admin.bans(GUILD) == []
    assert [(r["action"], r["target"], r["detail"]) for r in await admin.audit(GUILD, limit=5)] == [
        ("unban", f"member:{ALICE}", ""), ("ban", f"member:{ALICE}", "spam")]


async def test_queue_lists_running_then_fair_order(admin, ledger):
    a = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    b = await ledger.submit("imagine", BOB, GUILD, CHANNEL, {})
    await ledger.claim(a.id)
    view = await admin.queue(GUILD)
    assert [(e.job.id, e.position) for e in view] == [(a.id, None), (b.id, 1)]
    assert view[1].eta_s > view[0].eta_s
