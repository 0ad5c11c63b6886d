"""Wire level: /queue admin models and /queue admin model through discord.py's real gateway dispatch and HTTP, against
the fake Discord (the shared bot has one base model: the tiny one; several models are tests/bot/test_base_model_choice).
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")


def model_option(value: str, **extra) -> list[dict]:
    return [{"name": "name", "type": 3, "value": value, **extra}]


async def test_admins_see_the_models_with_family_residency_and_default(booth):
    fake = booth.fake
    name = booth.settings.default_model_name
    await booth.services.worker.wait_ready(120)  # the family and residency are what the worker reports
    listing = await fake.command(fake.member("modeladmin", manage_guild=True), "queue", subcommand=["admin", "models"])
    text = await booth.answer(listing)
    assert listing.ephemeral
    assert f"**{name}** — Stable Diffusion 1.x · `{booth.settings.model}` · loaded on the GPU" in text
    assert "this server's default, the bot's default" in text
    refused = await fake.command(fake.member("modelcurious"), "queue", subcommand=["admin", "models"])
    assert "Only server admins" in await booth.answer(refused)


async def test_admins_pick_the_server_default_by_name_with_autocomplete(booth):
    fake = booth.fake
    admin = fake.member("modelpicker", manage_guild=True)
    name = booth.settings.default_model_name
    await booth.services.worker.wait_ready(120)
    auto = await fake.autocomplete(admin, "queue", model_option(name[:3], focused=True), subcommand=["admin", "model"])
    await fake.wait_for(lambda: auto.callbacks, what="autocomplete answer")
    assert auto.callbacks[0]["data"]["choices"] == [{"name": f"{name} (Stable Diffusion 1.x)", "value": name}]
    plain = await fake.autocomplete(fake.member("modelpeek"), "queue", model_option("", focused=True),
                                    subcommand=["admin", "model"])
    await fake.wait_for(lambda: plain.callbacks, what="autocomplete answer")
    assert plain.callbacks[0]["data"]["choices"] == []  # members are not shown the admins' choices

    wrong = await fake.command(admin, "queue", model_option("sdxl-typo"), subcommand=["admin", "model"])
    assert f"no base model called sdxl-typo; it has {name}" in await booth.answer(wrong)
    assert await booth.services.base_models.stored_default(fake.guild_id) is None  # nothing changed
    chosen = await fake.command(admin, "queue", model_option(name), subcommand=["admin", "model"])
    assert f"default base model is now **{name} (Stable Diffusion 1.x)**" in await booth.answer(chosen)
    assert await booth.services.base_models.stored_default(fake.guild_id) == name
    audit = await booth.services.admin.audit(fake.guild_id)
    assert (audit[0]["action"], audit[0]["by"], audit[0]["detail"]) == ("base_model", admin.id, name)
    reset = await fake.command(admin, "queue", subcommand=["admin", "model"])
    assert "default base model is now" in await booth.answer(reset)
    assert await booth.services.base_models.stored_default(fake.guild_id) is None


async def test_imagine_with_a_concept_says_which_model_and_concepts_show_theirs(booth):
    from wire_support import imagine_options

    fake = booth.fake
    member = fake.member("modelconcept")
    name = booth.settings.default_model_name
    await booth.services.worker.wait_ready(120)
    concept = await booth.services.concepts.create(fake.guild_id, member.id, "zintarok", "man", base_model=name,
                                                   base_family="sd1")
    await booth.services.concepts.mark_ready(concept.id, str(booth.services.concepts.concept_dir(concept.id)
                                                             / "lora.safetensors"), None)
    await booth.services.admin.pause(fake.member("modelpauser", manage_guild=True).id)  # the job need not run
    try:
        interaction = await fake.command(member, "imagine", imagine_options("a photo of zintarok", steps=2))
        text = await booth.answer(interaction)
        assert f"Using {name} — zintarok was trained on it." in text
        job = await booth.latest_job(member)
        await booth.services.ledger.cancel(job.id, member.id)
    finally:
        await booth.services.admin.resume(fake.member("modelpauser", manage_guild=True).id)
    listing = await fake.command(member, "concepts", subcommand=["list"])
    assert f"`zintarok` — man · on {name} · ready" in await booth.answer(listing)
