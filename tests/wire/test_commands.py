"""Wire level: commands that answer without the GPU — help, DMs, the queue and its admin side (permission matrix),
limits and bans — through discord.py's real login, gateway dispatch and HTTP, against the fake Discord."""
from __future__ import annotations

import asyncio

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


async def test_a_role_renamed_to_the_admin_role_name_gives_no_admin_rights(booth):
    """BOOTHBOT_ADMIN_ROLE is given as a name ("Booth Admin"); the bot resolved it to the role's id at start. A member
    who creates another role and renames it to the same name does not become an admin."""
    from bench.wire.fake_discord import FakeMember, MEMBER_PERMISSIONS, snowflake

    fake = booth.fake
    impostor_role = {"id": str(snowflake()), "name": "helpers", "permissions": str(MEMBER_PERMISSIONS), "color": 0,
                     "hoist": False, "position": 5, "managed": False, "mentionable": False, "flags": 0}
    await fake.dispatch("GUILD_ROLE_CREATE", {"guild_id": str(fake.guild_id), "role": impostor_role})
    await fake.dispatch("GUILD_ROLE_UPDATE", {"guild_id": str(fake.guild_id),
                                              "role": {**impostor_role, "name": "booth admin"}})
    try:
        impostor = FakeMember(snowflake(), "impostor", (int(impostor_role["id"]),))
        interaction = await fake.command(impostor, "queue", subcommand=["admin", "pause"])
        assert "Only server admins" in await booth.answer(interaction)
        assert not await booth.services.admin.is_paused()
        assert booth.bot.admin_roles.role_id(booth.bot.get_guild(fake.guild_id)) == fake.admin_role_id
    finally:
        await fake.dispatch("GUILD_ROLE_DELETE", {"guild_id": str(fake.guild_id), "role_id": impostor_role["id"]})


async def test_queue_limit_refuses_the_job_past_it_with_what_to_do(booth):
    fake = booth.fake
    admin, member = fake.member("limitadmin", manage_guild=True), fake.member("limited")

    async def limits(*options):
        return await booth.answer(await fake.command(admin, "queue", list(options), subcommand=["admin", "limits"]))

    assert "1 waiting job(s) per member" in await limits({"name": "name", "type": 3, "value": "max_queued_jobs"},
                                                         {"name": "value", "type": 4, "value": 1})
    await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "pause"]))
    try:
        first = await fake.command(member, "imagine", [{"name": "prompt", "type": 3, "value": "a red dog"}])
        assert "Queued as job" in await booth.answer(first)
        second = await fake.command(member, "imagine", [{"name": "prompt", "type": 3, "value": "a blue dog"}])
        text = await booth.answer(second)
        assert second.ephemeral and "already have 1 job waiting" in text and "/queue" in text
        cleared = await fake.command(admin, "queue", [{"name": "member", "value": member}],
                                     subcommand=["admin", "clear"])
        assert "Cancelled 1 waiting job" in await booth.answer(cleared)
    finally:
        await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "resume"]))
        assert "3 waiting job(s) per member" in await limits({"name": "name", "type": 3, "value": "max_queued_jobs"},
                                                             {"name": "reset", "type": 5, "value": True})
    assert [j.status for j in await booth.services.ledger.list_jobs(owner_id=member.id)] == ["cancelled"]


async def test_bans_are_set_by_admins_and_refuse_members(booth):
    fake = booth.fake
    admin, member = fake.member("banadmin", admin_role=True), fake.member("banned")
    ban = await fake.command(admin, "queue", [{"name": "member", "value": member},
                                              {"name": "reason", "type": 3, "value": "spam"}],
                             subcommand=["admin", "ban"])
    assert "can no longer queue" in await booth.answer(ban)
    banned = await fake.command(member, "imagine", [{"name": "prompt", "type": 3, "value": "a red dog"}])
    assert "blocked you" in await booth.answer(banned) and "spam" in banned.text() and banned.ephemeral
    not_admin = await fake.command(member, "queue", [{"name": "member", "value": member}],
                                   subcommand=["admin", "unban"])
    assert "Only server admins" in await booth.answer(not_admin)
    unban = await fake.command(admin, "queue", [{"name": "member", "value": member}], subcommand=["admin", "unban"])
    assert "can use the bot again" in await booth.answer(unban)
    actions = [(row["action"], row["by"]) for row in await booth.services.admin.audit(fake.guild_id)]
    assert ("ban", admin.id) in actions and ("unban", admin.id) in actions


async def test_a_stale_command_gets_a_reload_hint(booth):
    interaction = await booth.fake.command(booth.fake.member("stale"), "oldcommand")
    assert "Reload Discord" in await booth.answer(interaction) and interaction.ephemeral


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
        # Marked delivered once Discord confirmed the edit (the outbox), a moment after the fake answered it.
        async def delivered():
            while (await booth.job(job.id)).delivered_at is None:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(delivered(), 30)
    finally:
        await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "resume"]))
