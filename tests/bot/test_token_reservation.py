"""Tokens cannot block others (issue 12): the services a command calls, with real parts — SQLite in tmp_path, the
real photo intake, the real worker on the tiny model — and a member's concept made the way concepts were made before
the token rules (ConceptService.create takes any token), so the squat of `photo` / `the` can be set up at all."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from bot.app import Services
from bot.dispatch.dispatcher import Dispatcher
from bot.errors import NotFound, UserError
from bot.jobs.ledger import Ledger
from bot.services.admin import AdminService
from bot.services.concepts import ConceptService
from bot.services.gallery import Gallery
from bot.services.submissions import submit_imagine, submit_training
from bot.settings import Settings
from bot.store.database import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")

GUILD, CHANNEL = 111111111111111111, 5
ALICE, BOB, ADMIN = 1001, 1002, 9009
FAST_TRAIN = {"prior_preservation": False, "sample_count": 0, "train_text_encoder": False, "resolution": 64,
              "steps": 2}
FAST_IMAGINE = {"steps": 2, "width": 64, "height": 64, "seed": 5}


def noise_photos(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    photos = []
    for i in range(count):
        pixels = np.random.default_rng(seed + i).integers(0, 255, (320, 320, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        photos.append((f"photo{i}.png", buffer.getvalue()))
    return photos


@pytest_asyncio.fixture(loop_scope="module")
async def services(tmp_path, worker, tiny_model_dir):
    """What start_services builds, on this test's database, with the module's worker; jobs run by run_next()."""
    settings = replace(Settings(), data_dir=tmp_path / "data", model=str(tiny_model_dir), max_queued_jobs=10,
                       trainings_per_day=10)
    store = await Store.open(settings.db_path)
    services = make_services(settings, store, worker)
    yield services
    await services.dispatcher.stop(grace_s=30)
    await store.close()


def make_services(settings, store, worker) -> Services:
    """What start_services builds around `store` and `worker`, without starting the dispatcher's loop."""
    ledger = Ledger(store, settings=settings)
    concepts = ConceptService(store, settings.data_dir, model=settings.model)
    gallery = Gallery(store)
    dispatcher = Dispatcher(settings, ledger, concepts, gallery, worker, poll_s=0.2)
    return Services(settings, store, ledger, concepts, gallery, AdminService(store, ledger, settings), worker,
                    dispatcher)


async def squat(services: Services, owner: int, token: str):
    """A private concept with a real word as its token and its training queued (photos on disk, as intake leaves
    them)."""
    concept = await services.concepts.create(GUILD, owner, token, "man")
    photos_dir = services.concepts.concept_dir(concept.id) / "photos"
    photos_dir.mkdir(parents=True)
    for i, (_, data) in enumerate(noise_photos(3, seed=concept.id * 10)):
        (photos_dir / f"{i:03d}.png").write_bytes(data)
    job = await services.ledger.submit("train", owner, GUILD, CHANNEL,
                                       {"concept_id": concept.id, "token": token, "class_name": "man", **FAST_TRAIN})
    await services.concepts.attach_job(concept.id, job.id, 3)
    return concept, job


async def imagine(services: Services, member: int, prompt: str):
    return await submit_imagine(services, guild_id=GUILD, member_id=member, channel_id=CHANNEL, role_ids=[],
                                prompt=prompt, **FAST_IMAGINE)


async def run(services: Services, job_id: int):
    """Run the queue until `job_id` has ended; returns the job."""
    while (job := await services.ledger.get(job_id)).status in ("queued", "running"):
        assert await services.dispatcher.run_next() is not None, "nothing ran"
    return job


async def test_a_squatted_word_in_training_blocks_nobody(services):
    photo, _ = await squat(services, ALICE, "photo")
    the, _ = await squat(services, ALICE, "the")
    assert (photo.status, the.status) == ("training", "training")

    job = await imagine(services, BOB, "a photo of the dog")  # main refused: "You can't use photo, the: …"
    params = await services.dispatcher.worker_params(job)
    assert params["concepts"] == [] and "forbidden_tokens" not in params
    await services.admin.bump(job.id, ADMIN)  # ahead of ALICE's trainings: they stay queued while it runs
    done = await run(services, job.id)
    assert done.status == "succeeded", done.error
    assert (await services.concepts.get(photo.id)).status == "training"
    assert "<lora:" not in done.result["parameters"] and "Lora hashes" not in done.result["parameters"]
    assert done.result["parameters"].startswith("a photo of the dog\n")


async def test_a_squatted_word_trained_and_ready_is_plain_text_to_others(services):
    concept, training = await squat(services, ALICE, "photo")
    assert (await run(services, training.id)).status == "succeeded"
    assert (await services.concepts.get(concept.id)).status == "ready"

    # Its owner's prompt loads the LoRA (so the check below can see a LoRA when there is one)...
    own = await run(services, (await imagine(services, ALICE, "a photo of a dog")).id)
    assert "<lora:photo:1>" in own.result["parameters"] and "Lora hashes" in own.result["parameters"]
    # ...another member's runs without it, and nothing in the result names the concept.
    other = await run(services, (await imagine(services, BOB, "a photo of a dog")).id)
    assert other.status == "succeeded", other.error
    assert (await services.dispatcher.worker_params(other))["concepts"] == []
    assert "<lora:" not in other.result["parameters"] and "Lora hashes" not in other.result["parameters"]
    assert other.result["notices"] == []


async def test_a_lora_tag_of_a_private_concept_reads_like_a_typo(services):
    concept, training = await squat(services, ALICE, "photo")
    await run(services, training.id)
    answers = {}
    for name in ("photo", "nosuch"):
        with pytest.raises(UserError) as refused:
            await imagine(services, BOB, f"<lora:{name}:1> a dog")
        answers[name] = str(refused.value).replace(name, "NAME")
    assert answers["photo"] == answers["nosuch"]
    assert "another member" not in answers["photo"] and "belongs" not in answers["photo"]
    assert await services.ledger.list_jobs(owner_id=BOB) == []


async def train(services: Services, member: int, token: str, class_name: str = "toy"):
    return await submit_training(services, guild_id=GUILD, member_id=member, channel_id=CHANNEL, role_ids=[],
                                 token=token, class_name=class_name, style=False, files=noise_photos(3))


@pytest.mark.parametrize("token, says, suggestion", [
    ("photo", "a common English word", "photox"),
    ("The", "a common English word", "thex"),
    ("dog", "a class word", "/train token:dogx class:dog"),
    ("women", "a class word", "/train token:womenx class:woman"),
])
async def test_real_words_are_refused_with_a_made_up_word_to_use(services, token, says, suggestion):
    with pytest.raises(UserError) as refused:
        await train(services, ALICE, token)
    text = str(refused.value)
    assert says in text and f"`{suggestion}`" in text and "made-up word" in text, text
    assert await services.concepts.by_token(GUILD, token) is None
    assert await services.ledger.list_jobs(owner_id=ALICE) == []


@pytest.mark.parametrize("token", ["sks", "ohwx", "squidarth"])
async def test_made_up_tokens_are_taken(services, token):
    job, report = await train(services, ALICE, token)
    assert job.params["token"] == token and report.ok
    assert (await services.concepts.by_token(GUILD, token)).status == "training"


async def test_a_real_word_concept_cannot_be_shared(services):
    concept, training = await squat(services, ALICE, "photo")
    await run(services, training.id)
    with pytest.raises(UserError, match="can't be shared.*photox"):
        await services.concepts.set_shared(concept.id, ALICE, True)
    assert await imagine(services, BOB, "a photo of a cat")  # still plain text to BOB


async def test_an_admin_releases_a_token(services):
    concept, training = await squat(services, ALICE, "photo")
    folder = services.concepts.concept_dir(concept.id)
    assert folder.is_dir()

    released = await services.concepts.release(GUILD, "Photo", ADMIN, reason="everyone writes photo")
    assert (released.id, released.owner_id) == (concept.id, ALICE)
    assert await services.concepts.by_token(GUILD, "photo") is None and not folder.exists()
    assert (await services.ledger.get(training.id)).status == "cancelled"
    entry = (await services.admin.audit(GUILD))[0]
    assert (entry["by"], entry["action"], entry["target"]) == (ADMIN, "release_token", f"member:{ALICE}")
    assert "photo" in entry["detail"] and "everyone writes photo" in entry["detail"]
    # The token is free: a concept of BOB's could hold it now (made directly: /train refuses the word itself).
    assert (await services.concepts.create(GUILD, BOB, "photo", "man")).owner_id == BOB
    with pytest.raises(NotFound, match="already free"):
        await services.concepts.release(GUILD, "squidarth", ADMIN)
