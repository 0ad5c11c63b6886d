"""Photo retention (BOOTHBOT_PHOTO_RETENTION_DAYS): the sweep deletes uploaded photos N days after a training ended,
never while the training can still run, records it on the concept, and runs at start and then periodically."""
from __future__ import annotations

import asyncio

from bot.services.retention import DAY_S, PhotoRetention

GUILD, CHANNEL = 111111111111111111, 333333333333333333
ALICE, BOB = 1001, 1002


async def concept_in_training(concepts, ledger, owner, token):
    """A concept with photos on disk, a checkpoint folder and its training job claimed (running)."""
    concept = await concepts.create(GUILD, owner, token, "man")
    directory = concepts.concept_dir(concept.id)
    (directory / "photos").mkdir()
    (directory / "photos" / "000.png").write_bytes(b"photo")
    (directory / "checkpoint").mkdir()
    (directory / "checkpoint" / "inputs.safetensors").write_bytes(b"latents of the photos")
    job = await ledger.submit("train", owner, GUILD, CHANNEL, {"concept_id": concept.id})
    await concepts.attach_job(concept.id, job.id, photo_count=1)
    assert (await ledger.claim(job.id)).status == "running"
    return concept, job


async def finish_training(concepts, ledger, concept, job):
    lora = concepts.concept_dir(concept.id) / "lora.safetensors"
    lora.write_bytes(b"weights")
    assert await concepts.mark_ready(concept.id, str(lora), None)
    assert await ledger.succeed(job.id, {"lora": str(lora)}, 1.0)
    return lora


async def test_photos_go_n_days_after_the_training_the_lora_stays(store, concepts, ledger, settings, clock):
    retention = PhotoRetention(store, settings.data_dir, days=7, clock=clock)
    concept, job = await concept_in_training(concepts, ledger, ALICE, "sid")
    lora = await finish_training(concepts, ledger, concept, job)
    photos = concepts.concept_dir(concept.id) / "photos"

    clock.advance(7 * DAY_S - 60)
    assert await retention.sweep() == 0 and photos.is_dir()
    assert (await concepts.get(concept.id)).photos_deleted_at is None

    clock.advance(120)
    assert await retention.sweep() == 1
    assert not photos.exists() and lora.read_bytes() == b"weights"
    after = await concepts.get(concept.id)
    assert after.status == "ready" and after.photos_deleted_at == clock.now
    assert await retention.sweep() == 0  # once


async def test_a_training_that_can_still_run_keeps_its_photos(store, concepts, ledger, settings, clock):
    """Running, or waiting for its next slice (requeued, resumes from its checkpoint): never swept, however old."""
    retention = PhotoRetention(store, settings.data_dir, days=0, clock=clock)
    running, _ = await concept_in_training(concepts, ledger, ALICE, "sid")
    sliced, sliced_job = await concept_in_training(concepts, ledger, BOB, "rex")
    assert await ledger.requeue(sliced_job.id, 5.0)
    clock.advance(365 * DAY_S)
    assert await retention.sweep() == 0
    for concept in (running, sliced):
        assert (concepts.concept_dir(concept.id) / "photos" / "000.png").is_file()
        assert (concepts.concept_dir(concept.id) / "checkpoint").is_dir()


async def test_a_failed_training_loses_its_photos_and_checkpoint_too(store, concepts, ledger, settings, clock):
    retention = PhotoRetention(store, settings.data_dir, days=2, clock=clock)
    concept, job = await concept_in_training(concepts, ledger, ALICE, "sid")
    assert await ledger.fail(job.id, "The worker ran out of memory.")
    clock.advance(2 * DAY_S)
    assert await retention.sweep() == 1
    directory = concepts.concept_dir(concept.id)
    assert not (directory / "photos").exists() and not (directory / "checkpoint").exists()
    failed = await concepts.get(concept.id)
    assert failed.status == "failed" and failed.photos_deleted_at == clock.now


async def test_zero_days_means_at_the_first_sweep_after_the_training(store, concepts, ledger, settings, clock):
    retention = PhotoRetention(store, settings.data_dir, days=0, clock=clock)
    concept, job = await concept_in_training(concepts, ledger, ALICE, "sid")
    assert await retention.sweep() == 0  # still running
    await finish_training(concepts, ledger, concept, job)
    assert await retention.sweep() == 1
    assert not (concepts.concept_dir(concept.id) / "photos").exists()


async def test_the_task_sweeps_at_start_and_stops(store, concepts, ledger, settings, clock):
    concept, job = await concept_in_training(concepts, ledger, ALICE, "sid")
    await finish_training(concepts, ledger, concept, job)
    clock.advance(8 * DAY_S)
    retention = PhotoRetention(store, settings.data_dir, days=7, clock=clock)
    retention.start()
    try:
        for _ in range(200):  # the first sweep runs at once, not after the first hour
            if (await concepts.get(concept.id)).photos_deleted_at is not None:
                break
            await asyncio.sleep(0.05)
        assert (await concepts.get(concept.id)).photos_deleted_at == clock.now
    finally:
        await retention.stop()
    assert retention._task is None
