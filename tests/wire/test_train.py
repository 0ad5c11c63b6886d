"""Wire level: /train end to end on the tiny model (attachments downloaded during the command, intake report, live
status, samples and how-to in the channel even after the interaction token expired), then everything a trained
concept allows — /imagine with it, /concepts for owner / other member / admin — and /forget."""
from __future__ import annotations

import re

import pytest
import pytest_asyncio
from wire_support import imagine_options, photo_bytes, run_imagine

import bot.services.submissions

pytestmark = pytest.mark.asyncio(loop_scope="session")
# Keeps the tiny model's training to seconds: no class images, one sample, the tiny model's own 64 px.
FAST_RECIPE = {"prior_preservation": False, "sample_count": 1, "resolution": 64}
TRAIN_STEPS = 4
TOKEN = "zqxv"


def train_options(token: str, class_name: str, attachments: list[dict], **extra) -> list[dict]:
    options = [{"name": "token", "type": 3, "value": token}, {"name": "class", "type": 3, "value": class_name}]
    for index, attachment in enumerate(attachments):
        name = "zip" if attachment["filename"].endswith(".zip") else f"photo{index + 1}"
        options.append({"name": name, "type": 11, "value": attachment["id"]})
    types = {"steps": 4, "style": 5}
    return options + [{"name": k, "type": types[k], "value": v} for k, v in extra.items()]


def photos(booth, count: int, first_seed: int = 0) -> list[dict]:
    return booth.attach(*[(f"me{i}.png", photo_bytes(first_seed + i), "image/png") for i in range(count)])


async def train(booth, member, token: str, attachments: list[dict], **extra):
    return await booth.fake.command(member, "train", train_options(token, "dog", attachments, **extra),
                                    attachments=attachments)


@pytest.fixture(scope="module", autouse=True)
def fast_recipe():
    patch = pytest.MonkeyPatch()
    patch.setattr(bot.services.submissions, "TRAIN_RECIPE", FAST_RECIPE)
    yield
    patch.undo()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def trained(booth):
    """One concept trained through /train by `owner`; the interaction token expires right after the intake report."""
    fake = booth.fake
    owner = fake.member("trainer-owner")
    attachments = photos(booth, 3)
    interaction = await train(booth, owner, TOKEN, attachments, steps=TRAIN_STEPS)
    report = await booth.answer(interaction, timeout=60)
    downloaded = list(fake.cdn_downloads)
    fake.expire_interaction_tokens()  # the training outlives the 15-minute interaction token
    job = await booth.latest_job(owner)
    finished = await booth.wait_job(job.id, timeout=240)
    assert finished.status == "succeeded", finished.error
    final = await fake.wait_for(lambda: fake.channel_messages(f"`{TOKEN}` is ready"), what="the training's result")
    concept = await booth.services.concepts.by_token(fake.guild_id, TOKEN)
    return dict(owner=owner, interaction=interaction, report=report, job=finished, final=final[0], concept=concept,
                attachments=attachments, downloaded=downloaded)


async def test_train_happy_path(booth, trained):
    fake, job = booth.fake, trained["job"]
    # The photos were fetched while the command ran, and the member saw an ephemeral intake report with thumbnails.
    assert all(a["url"].endswith(p) for a, p in zip(trained["attachments"], trained["downloaded"][-3:]))
    interaction = trained["interaction"]
    assert interaction.ephemeral and "3" in trained["report"] and "queued" in trained["report"]
    assert any(a["filename"] == "accepted.jpg" for m in interaction.replies for a in m.get("attachments") or [])
    # The channel got a status message (queue place, then progress), throttled to one edit per ~2 s.
    edits = [r for r in fake.requests if r.method == "PATCH" and r.path.endswith(f"/messages/{job.message_id}")]
    assert edits and any("step" in str(r.json) for r in edits)
    assert any(name == "preview.webp" for r in edits for name, _ in r.files), "no sample preview was shown"
    gaps = [b.at - a.at for a, b in zip(edits, edits[1:])]
    assert all(gap >= 1.9 for gap in gaps), gaps
    # The result: samples and how to use the concept, posted with the bot token after the interaction expired.
    final = trained["final"]
    assert f"<@{trained['owner'].id}>" in final["content"]
    assert f"/imagine prompt: a photo of {TOKEN} dog" in final["content"]
    samples = fake.file_bytes(final)
    assert len(samples) == 1 and all(data[:4] == b"\x89PNG" for data in samples.values())
    # The delete of the status message follows the result post: it may still be on its way.
    await fake.wait_for(lambda: job.message_id in fake.deleted_messages, what="the status message deleted")
    concept = trained["concept"]
    assert concept.status == "ready" and concept.photo_count == 3 and concept.job_id == job.id


async def test_owner_imagines_with_the_concept_and_to_others_it_is_plain_text(booth, trained):
    fake, owner = booth.fake, trained["owner"]
    job, _ = await run_imagine(booth, owner, f"a photo of {TOKEN} on the beach", steps=2)
    assert f"<lora:{TOKEN}:1>" in job.result["parameters"]
    job, _ = await run_imagine(booth, fake.member("trainer-other"), f"a photo of {TOKEN}", steps=2)
    assert "<lora:" not in job.result["parameters"]  # ran without the LoRA, and nothing says it exists


async def test_parameters_button_hides_a_private_lora_from_others(booth, trained):
    fake, owner = booth.fake, trained["owner"]
    job, result = await run_imagine(booth, owner, f"a photo of {TOKEN} in the snow", steps=2)
    lora_hash = re.search(rf'Lora hashes: "{TOKEN}: (\w+)"', job.result["parameters"])[1]

    async def parameters(member) -> str:
        return await booth.answer(await fake.click(member, result, f"bb:params:{job.id}"))

    mine = await parameters(owner)
    assert f"<lora:{TOKEN}:1>" in mine and lora_hash in mine
    theirs = await parameters(fake.member("params-viewer"))
    assert "Steps: 2" in theirs and "<lora:a private concept>" in theirs
    assert f"<lora:{TOKEN}" not in theirs and lora_hash not in theirs and "Lora hashes" not in theirs


async def test_concepts_permission_matrix(booth, trained):
    fake, owner = booth.fake, trained["owner"]
    other, admin = fake.member("concepts-other"), fake.member("concepts-admin", admin_role=True)

    async def concepts(member, sub: str, token: str = TOKEN):
        interaction = await fake.command(member, "concepts", [{"name": "concept", "type": 3, "value": token}],
                                         subcommand=[sub])
        return interaction, await booth.answer(interaction)

    async def choices(member, sub: str) -> list[str]:
        interaction = await fake.autocomplete(member, "concepts", [{"name": "concept", "type": 3, "value": "zq",
                                                                    "focused": True}], subcommand=[sub])
        await fake.wait_for(lambda: interaction.callbacks, what="autocomplete")
        return [c["value"] for c in interaction.callbacks[0]["data"]["choices"]]

    assert await choices(owner, "info") == [TOKEN] and await choices(other, "info") == []
    _, text = await concepts(owner, "info")
    assert "yours" in text and f"a photo of {TOKEN} dog" in text
    for sub in ("info", "share", "export", "delete"):
        interaction, text = await concepts(other, sub)
        assert interaction.ephemeral and "You have no concept called" in text, (sub, text)

    export, _ = await concepts(owner, "export")
    files = [a for m in export.replies for a in m.get("attachments") or []]
    assert export.ephemeral and [f["filename"] for f in files] == [f"{TOKEN}.safetensors"]
    admin_export, text = await concepts(admin, "export")
    assert "Only the owner" in text and not [a for m in admin_export.replies for a in m.get("attachments") or []]

    _, text = await concepts(owner, "share")
    assert "now shared" in text
    assert await choices(other, "info") == [TOKEN]
    job, _ = await run_imagine(booth, other, f"a photo of {TOKEN} as a jedi", steps=2)
    assert job.status == "succeeded"
    for sub, refusal in (("export", "Only the owner"), ("share", "belongs to someone else"),
                         ("delete", "belongs to someone else")):
        _, text = await concepts(other, sub)
        assert refusal in text, (sub, text)
    _, text = await concepts(admin, "unshare")
    assert "private again" in text
    assert await choices(other, "info") == []


async def test_bad_photos_are_explained_and_nothing_is_queued(booth):
    fake = booth.fake
    member = fake.member("bad-photos")
    attachments = booth.attach(("notes.txt", b"not a photo at all", "text/plain"),
                               ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png"),
                               ("ok.png", photo_bytes(100), "image/png"))
    interaction = await train(booth, member, "badpix", attachments, steps=2)
    text = await booth.answer(interaction)
    assert interaction.ephemeral and "broken.png" in text and "notes.txt" in text
    assert await booth.latest_job(member) is None
    assert await booth.services.concepts.by_token(fake.guild_id, "badpix") is None


async def test_oversized_photo_is_refused_before_it_is_downloaded(booth):
    fake = booth.fake
    member = fake.member("big-photos")
    big = booth.attach(("huge.png", b"\x89PNG" + b"\x00" * (3 * 1024 * 1024), "image/png"))[0]
    interaction = await train(booth, member, "bigpix", [big], steps=2)
    text = await booth.answer(interaction)
    assert interaction.ephemeral and "huge.png" in text and "MB" in text
    assert not any(path.endswith("/huge.png") for path in fake.cdn_downloads)


async def test_no_photos_says_how_to_attach_them(booth):
    interaction = await booth.fake.command(booth.fake.member("no-photos"), "train", train_options("nopix", "dog", []))
    assert "Attach your photos" in await booth.answer(interaction)


async def test_forget_erases_the_members_concepts_and_images_after_confirmation(booth):
    fake = booth.fake
    member = fake.member("forgetful")
    job, result = await run_imagine(booth, member, "a red dog", steps=2)
    images = list(job.result["images"])
    ask = await fake.command(member, "forget")
    assert "cannot be undone" in await booth.answer(ask) and ask.ephemeral
    message = ask.callbacks[0]["data"]
    confirm_id = message["components"][0]["components"][0]["custom_id"]
    intruder = await fake.click(fake.member("intruder"), {**ask.original, **message}, confirm_id)
    assert "not for you" in await booth.answer(intruder)
    confirm = await fake.click(member, {**ask.original, **message}, confirm_id)
    text = await fake.wait_for(lambda: "Done." in confirm.text() and confirm.text(), what="the /forget summary")
    assert "1 image(s)" in text and "1 job record(s)" in text
    assert await booth.latest_job(member) is None
    assert not any(__import__("os").path.exists(p) for p in images)
    # The buttons under the old result now say the images are gone instead of failing.
    reroll = await fake.click(fake.member("late-clicker"), result, f"bb:reroll:{job.id}")
    assert "no longer available" in await booth.answer(reroll)


async def test_token_taken_by_someone_else_is_refused(booth, trained):
    interaction = await train(booth, booth.fake.member("copycat"), TOKEN, photos(booth, 3, 50), steps=2)
    text = await booth.answer(interaction)
    assert interaction.ephemeral and "already taken" in text
    assert re.search(r"pick another", text)


async def test_photos_in_a_zip_and_a_cancelled_training_shows_as_failed(booth):
    import io
    import zipfile

    fake = booth.fake
    admin, member = fake.member("zip-admin", manage_guild=True), fake.member("zipper")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(4):
            archive.writestr(f"holiday/{i}.png", photo_bytes(200 + i))
    zipped = booth.attach(("photos.zip", buffer.getvalue(), "application/zip"))
    await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "pause"]))
    try:
        interaction = await train(booth, member, "zipdog", zipped, steps=2)
        assert "4 photos accepted" in await booth.answer(interaction)
        job = await booth.latest_job(member)
        too_soon = await fake.command(member, "imagine", imagine_options("a photo of zipdog", steps=2))
        assert "zipdog is still training" in await booth.answer(too_soon) and too_soon.ephemeral
        cancel = await fake.command(member, "queue", [{"name": "job", "type": 4, "value": job.id}],
                                    subcommand=["cancel"])
        assert "cancelled" in await booth.answer(cancel)
    finally:
        await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "resume"]))
    concept = await booth.services.concepts.by_token(fake.guild_id, "zipdog")
    assert concept.status == "failed"
    listing = await fake.command(member, "concepts", subcommand=["list"])
    assert "training failed" in await booth.answer(listing)


async def test_banned_member_costs_no_downloads(booth):
    fake = booth.fake
    member = fake.member("banned-trainer")
    await booth.services.admin.ban(0, fake.guild_id, member.id, "test")
    attachments = booth.attach(*[(f"banned{i}.png", photo_bytes(300 + i), "image/png") for i in range(3)])
    text = await booth.answer(await train(booth, member, "banpix", attachments, steps=2))
    assert "blocked you from using the bot" in text
    assert not any("/banned" in path for path in fake.cdn_downloads)


async def test_zip_in_a_photo_slot_is_refused(booth):
    member = booth.fake.member("zip-slot")
    attachment = booth.attach(("photos.zip", b"PK\x03\x04" + b"\0" * 100, "application/zip"))[0]
    options = train_options("zippix", "dog", [])
    options.append({"name": "photo1", "type": 11, "value": attachment["id"]})
    text = await booth.answer(await booth.fake.command(member, "train", options, attachments=[attachment]))
    assert "zip" in text and "option" in text
