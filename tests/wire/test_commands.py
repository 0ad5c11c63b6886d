"""Wire level: commands that answer without the GPU — help, DMs, the queue and its admin side (permission matrix),
limits and bans — through discord.py's real login, gateway dispatch and HTTP, against the fake Discord."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_commands_are_synced_to_the_configured_server(booth):
    synced = booth.fake.commands[str(booth.fake.guild_id)]
    assert {c["name"] for c in synced} == {"train", "imagine", "queue", "concepts", "forget", "help"}
    assert "global" not in booth.fake.commands


async def test_help_explains_the_flow_ephemerally(booth):
    interaction = await booth.fake.command(booth.fake.member("newcomer"), "help")
    text = await booth.answer(interaction)
    assert "/train token:squidarth class:man" in text and "/imagine" in text
    assert interaction.ephemeral


async def test_direct_messages_are_refused_politely(booth):
    interaction = await booth.fake.command(booth.fake.member("dm-user"), "help", in_dm=True)
    text = await booth.answer(interaction)
    assert "inside a server" in text and interaction.ephemeral


async def test_queue_show_with_no_jobs(booth):
    interaction = await booth.fake.command(booth.fake.member("idle"), "queue", subcommand=["show"])
    assert "no jobs waiting or running" in await booth.answer(interaction)


@pytest.mark.parametrize("who, allowed", [("member", False), ("admin_role", True), ("manage_guild", True)])
async def test_admin_commands_permission_matrix(booth, who, allowed):
    fake = booth.fake
    member = {"member": fake.member("plain"), "admin_role": fake.member("roleadmin", admin_role=True),
              "manage_guild": fake.member("manager", manage_guild=True)}[who]
    interaction = await fake.command(member, "queue", subcommand=["admin", "pause"])
    text = await booth.answer(interaction)
    assert interaction.ephemeral
    audit = await booth.services.admin.audit(fake.guild_id)
    if allowed:
        assert "paused" in text
        assert await booth.services.admin.is_paused()
        assert audit[0]["action"] == "pause" and audit[0]["by"] == member.id
        resume = await fake.command(member, "queue", subcommand=["admin", "resume"])
        assert "running again" in await booth.answer(resume)
        assert not await booth.services.admin.is_paused()
    else:
        assert "Only server admins" in text
        assert not await booth.services.admin.is_paused()
        assert all(row["by"] != member.id for row in audit)


async def test_limits_and_bans_are_set_by_admins_and_refuse_members(booth):
    fake = booth.fake
    admin, member = fake.member("limitadmin", manage_guild=True), fake.member("limited")
    set_limit = await fake.command(admin, "queue", [{"name": "name", "type": 3, "value": "max_queued_jobs"},
                                                    {"name": "value", "type": 4, "value": 0}],
                                   subcommand=["admin", "limits"])
    assert "0 waiting job(s) per member" in await booth.answer(set_limit)
    refused = await fake.command(member, "imagine", [{"name": "prompt", "type": 3, "value": "a red dog"}])
    assert "does not accept new jobs" in await booth.answer(refused) and refused.ephemeral
    reset = await fake.command(admin, "queue", [{"name": "name", "type": 3, "value": "max_queued_jobs"},
                                                {"name": "reset", "type": 5, "value": True}],
                               subcommand=["admin", "limits"])
    assert "3 waiting job(s) per member" in await booth.answer(reset)

    ban = await fake.command(admin, "queue", [{"name": "member", "value": member},
                                              {"name": "reason", "type": 3, "value": "spam"}],
                             subcommand=["admin", "ban"])
    assert "can no longer queue" in await booth.answer(ban)
    banned = await fake.command(member, "imagine", [{"name": "prompt", "type": 3, "value": "a red dog"}])
    assert "blocked you" in await booth.answer(banned) and "spam" in banned.text()
    unban = await fake.command(admin, "queue", [{"name": "member", "value": member}], subcommand=["admin", "unban"])
    assert "can use the bot again" in await booth.answer(unban)
    actions = [row["action"] for row in await booth.services.admin.audit(fake.guild_id)]
    assert {"set_limit", "ban", "unban"} <= set(actions)


async def test_concepts_list_and_autocomplete_when_empty(booth):
    member = booth.fake.member("noconcepts")
    listing = await booth.fake.command(member, "concepts", subcommand=["list"])
    assert "no concepts yet" in await booth.answer(listing)
    auto = await booth.fake.autocomplete(member, "concepts", [{"name": "concept", "type": 3, "value": "",
                                                               "focused": True}], subcommand=["info"])
    await booth.fake.wait_for(lambda: auto.callbacks, what="autocomplete answer")
    assert auto.callbacks[0]["type"] == 8 and auto.callbacks[0]["data"]["choices"] == []


async def test_unknown_concept_gets_a_next_step(booth):
    interaction = await booth.fake.command(booth.fake.member("curious"), "concepts",
                                           [{"name": "concept", "type": 3, "value": "nobody"}], subcommand=["info"])
    text = await booth.answer(interaction)
    assert "/concepts list" in text and interaction.ephemeral


async def test_cancel_own_job_but_not_someone_elses(booth):
    fake = booth.fake
    admin, owner, other = fake.member("cancel-admin", manage_guild=True), fake.member("canceller"), fake.member("nosy")
    await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "pause"]))
    try:
        queued = await fake.command(owner, "imagine", [{"name": "prompt", "type": 3, "value": "a red dog"}])
        await booth.answer(queued)
        job = await booth.latest_job(owner)
        status = await fake.wait_for(lambda: fake.channel_messages(f"job {job.id} is"), what="the status message")
        assert "paused by an admin" in str(status)

        mine = await fake.command(owner, "queue", subcommand=["show"])
        assert f"**{job.id}**" in await booth.answer(mine) and "paused" in mine.text()

        refused = await fake.command(other, "queue", [{"name": "job", "type": 4, "value": job.id}],
                                     subcommand=["cancel"])
        assert "not yours" in await booth.answer(refused) and refused.ephemeral
        assert (await booth.job(job.id)).status == "queued"

        cancel = await fake.command(owner, "queue", [{"name": "job", "type": 4, "value": job.id}],
                                    subcommand=["cancel"])
        assert "cancelled" in await booth.answer(cancel)
        cancelled = await booth.wait_job(job.id, ("cancelled",))
        await fake.wait_for(lambda: "was cancelled" in (fake.messages[cancelled.message_id].get("content") or ""),
                            what="the status message to say cancelled")
        assert (await booth.job(job.id)).delivered_at is not None
    finally:
        await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "resume"]))
