"""Wire level: what /imagine and the admins' safety switch promise, on the real bot and worker (tiny model, 64 px
native, no safety checker): sizes the model cannot make are refused at submit, and the per-server safety switch
lands in each job's params (and refuses /imagine while the model has no checker to honour it)."""
from __future__ import annotations

import pytest
from wire_support import imagine_options

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_size_the_model_cannot_make_is_refused_at_submit(booth):
    await booth.services.worker.wait_ready(timeout=120)
    member = booth.fake.member("size-asker")
    interaction = await booth.fake.command(member, "imagine", imagine_options("a red fox", size="portrait", steps=2))
    text = await booth.answer(interaction)
    assert interaction.ephemeral and "512×768 is not a size this model can make" in text
    assert "multiples of 8 from 64 to 128 px" in text and "leave size empty for the model's own 64×64" in text
    assert await booth.latest_job(member) is None


async def test_the_safety_switch_is_per_server_and_goes_with_each_job(booth):
    fake = booth.fake
    await booth.services.worker.wait_ready(timeout=120)
    admin, member = fake.member("safety-admin", manage_guild=True), fake.member("safety-member")

    async def safety(state: str | None = None) -> str:
        options = [] if state is None else [{"name": "state", "type": 3, "value": state}]
        return await booth.answer(await fake.command(admin, "queue", options, subcommand=["admin", "safety"]))

    assert "**off**" in await safety()  # BOOTHBOT_SAFETY=false: the default for a server nobody set
    turned_on = await safety("on")
    assert "**on**" in turned_on and "has no safety checker" in turned_on
    assert await booth.services.admin.safety_for(fake.guild_id)
    assert (await booth.services.admin.audit(fake.guild_id))[0]["action"] == "safety"
    try:
        refused = await fake.command(member, "imagine", imagine_options("a red fox", steps=2))
        text = await booth.answer(refused)
        assert refused.ephemeral and "safety filter is on for this server" in text and "state:off" in text
        assert await booth.latest_job(member) is None
    finally:
        assert "**off**" in await safety("off")
    queued = await fake.command(member, "imagine", imagine_options("a red fox", steps=2))
    assert "Queued as job" in await booth.answer(queued)
    job = await booth.latest_job(member)
    assert job.params["safety"] is False
    assert (await booth.wait_job(job.id)).status == "succeeded"
    assert "off for /imagine on this server (the bot's default)" in (await safety("default")).replace("**", "")
