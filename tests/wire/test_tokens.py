"""Wire level: tokens cannot block others (issue 12) — /train refuses a real word with a made-up one to use instead,
a squatted word from before that rule is plain text in another member's /imagine, and an admin releases it."""
from __future__ import annotations

import pytest
from wire_support import photo_bytes, run_imagine

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_word_cannot_be_squatted_and_an_old_squat_blocks_nobody(booth):
    fake = booth.fake
    squatter, member = fake.member("token-squatter"), fake.member("token-photographer")
    admin = fake.member("token-admin", manage_guild=True)

    attachments = booth.attach(*[(f"sq{i}.png", photo_bytes(400 + i), "image/png") for i in range(3)])
    options = [{"name": "token", "type": 3, "value": "photo"}, {"name": "class", "type": 3, "value": "dog"}]
    options += [{"name": f"photo{i + 1}", "type": 11, "value": a["id"]} for i, a in enumerate(attachments)]
    refused = await fake.command(squatter, "train", options, attachments=attachments)
    text = await booth.answer(refused)
    assert refused.ephemeral and "common English word" in text and "`photox`" in text, text
    assert await booth.services.concepts.by_token(fake.guild_id, "photo") is None
    assert await booth.latest_job(squatter) is None

    # A private concept with a real word, made before the rule (still training): others' prompts run, without it.
    old = await booth.services.concepts.create(fake.guild_id, squatter.id, "the", "man")
    job, result = await run_imagine(booth, member, "a photo of the dog", steps=2)
    assert job.status == "succeeded" and "<lora:" not in job.result["parameters"]

    ask = await fake.command(admin, "concepts", [{"name": "token", "type": 3, "value": "the"}],
                             subcommand=["release"])
    assert "deleted for good" in await booth.answer(ask) and ask.ephemeral
    message = ask.callbacks[0]["data"]
    confirm = await fake.click(admin, {**ask.original, **message},
                               message["components"][0]["components"][0]["custom_id"])
    text = await fake.wait_for(lambda: "is free" in confirm.text() and confirm.text(), what="the release")
    assert f"<@{squatter.id}>" in text and "audit" in text
    assert await booth.services.concepts.by_token(fake.guild_id, "the") is None
    assert await booth.services.concepts.get(old.id) is None
