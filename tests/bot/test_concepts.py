"""Concept registry: unique tokens per server, the ownership matrix, deletion with files, training outcomes."""
from __future__ import annotations

import pytest

from bot.errors import NotFound, PermissionDenied, UserError

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 333333333333333333
ALICE, BOB, ADMIN = 1001, 1002, 9009


async def ready(concepts, guild, owner, token, shared=False):
    concept = await concepts.create(guild, owner, token, "man")
    lora = concepts.concept_dir(concept.id) / "lora.safetensors"
    lora.write_bytes(b"weights")
    assert await concepts.mark_ready(concept.id, str(lora), None)
    if shared:
        await concepts.set_shared(concept.id, owner, True)
    return await concepts.get(concept.id)


async def test_create_gives_a_training_concept_and_an_empty_directory(concepts, settings, clock):
    concept = await concepts.create(GUILD, ALICE, " sid ", "man", style=False)
    assert (concept.guild_id, concept.owner_id, concept.token, concept.class_name) == (GUILD, ALICE, "sid", "man")
    assert (concept.status, concept.shared, concept.style, concept.job_id) == ("training", False, False, None)
    assert concept.created_at == clock.now
    directory = concepts.concept_dir(concept.id)
    assert directory == settings.data_dir / "concepts" / str(concept.id) and directory.is_dir()
    assert list(directory.iterdir()) == []
    assert await concepts.by_token(GUILD, "SID") == concept
    assert await concepts.by_token(OTHER_GUILD, "sid") is None


async def test_tokens_are_unique_per_server_whatever_the_case(concepts):
    await concepts.create(GUILD, ALICE, "sid", "man")
    with pytest.raises(UserError, match="The token sid is already taken on this server"):
        await concepts.create(GUILD, BOB, "Sid", "man")
    with pytest.raises(UserError, match="You already have a concept called sid"):
        await concepts.create(GUILD, ALICE, "SID", "man")
    with pytest.raises(UserError, match="token is empty"):
        await concepts.create(GUILD, ALICE, "  ", "man")
    await concepts.create(OTHER_GUILD, BOB, "sid", "man")  # another server: free


async def test_a_failed_concept_of_the_same_owner_is_replaced(concepts, ledger):
    failed = await concepts.create(GUILD, ALICE, "sid", "man")
    (concepts.concept_dir(failed.id) / "photos").mkdir()
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": failed.id})
    await concepts.attach_job(failed.id, job.id)
    await ledger.claim(job.id)
    await ledger.fail(job.id, "The photos were too blurry.")
    assert (await concepts.get(failed.id)).error == "The photos were too blurry."
    again = await concepts.create(GUILD, ALICE, "sid", "man")
    assert again.id != failed.id and await concepts.get(failed.id) is None
    assert not concepts.concept_dir(failed.id).exists()


async def test_ownership_matrix(concepts):
    private = await ready(concepts, GUILD, ALICE, "sidq")
    shared = await ready(concepts, GUILD, ALICE, "rexo", shared=True)
    training = await concepts.create(GUILD, ALICE, "wipz", "dog")
    await concepts.set_shared(training.id, ALICE, True)  # shared but not ready yet
    bobs = await ready(concepts, GUILD, BOB, "bobby")

    def tokens(cs):
        return sorted(c.token for c in cs)

    # see
    assert tokens(await concepts.visible(GUILD, ALICE)) == ["rexo", "sidq", "wipz"]
    assert tokens(await concepts.visible(GUILD, BOB)) == ["bobby", "rexo"]
    assert tokens(await concepts.visible(GUILD, ADMIN, is_admin=True)) == ["bobby", "rexo", "sidq", "wipz"]
    assert await concepts.visible(OTHER_GUILD, ALICE) == []
    # use
    assert tokens(await concepts.usable(GUILD, ALICE)) == ["rexo", "sidq"]
    assert tokens(await concepts.usable(GUILD, BOB)) == ["bobby", "rexo"]
    assert tokens(await concepts.usable(GUILD, ADMIN)) == ["rexo"]  # an admin cannot use private likenesses
    # share
    with pytest.raises(PermissionDenied, match="only its owner can share it"):
        await concepts.set_shared(private.id, BOB, True)
    with pytest.raises(PermissionDenied):
        await concepts.set_shared(private.id, ADMIN, True, is_admin=True)
    assert not (await concepts.set_shared(shared.id, ADMIN, False, is_admin=True)).shared  # moderation
    with pytest.raises(PermissionDenied):
        await concepts.set_shared(shared.id, BOB, False)
    assert (await concepts.set_shared(private.id, ALICE, True)).shared
    assert "sidq" in tokens(await concepts.usable(GUILD, BOB))
    # delete
    with pytest.raises(PermissionDenied, match="only its owner or an admin can delete it"):
        await concepts.delete(bobs.id, ALICE)
    await concepts.delete(bobs.id, ADMIN, is_admin=True)
    await concepts.delete(private.id, ALICE)
    assert tokens(await concepts.visible(GUILD, ADMIN, is_admin=True)) == ["rexo", "wipz"]
    with pytest.raises(NotFound):
        await concepts.delete(private.id, ALICE)


async def test_delete_removes_files_frees_the_token_and_stops_training(concepts, ledger):
    concept = await concepts.create(GUILD, ALICE, "sid", "man")
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": concept.id})
    await concepts.attach_job(concept.id, job.id, photo_count=12)
    assert (await concepts.get(concept.id)).photo_count == 12
    photos = concepts.concept_dir(concept.id) / "photos"
    photos.mkdir()
    (photos / "000.png").write_bytes(b"png")

    await concepts.delete(concept.id, ALICE)
    assert not concepts.concept_dir(concept.id).exists()
    assert await concepts.get(concept.id) is None and await concepts.by_token(GUILD, "sid") is None
    assert (await ledger.get(job.id)).status == "cancelled"
    assert (await concepts.create(GUILD, BOB, "sid", "man")).owner_id == BOB


async def test_results_arriving_after_a_delete_are_cleaned_up(concepts, ledger):
    concept = await concepts.create(GUILD, ALICE, "sid", "man")
    job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": concept.id})
    await concepts.attach_job(concept.id, job.id)
    await ledger.claim(job.id)
    await concepts.delete(concept.id, ALICE)
    assert await ledger.cancel_requested(job.id)
    # the worker had not noticed yet and wrote its LoRA
    out = concepts.concept_dir(concept.id)
    out.mkdir(parents=True)
    (out / "lora.safetensors").write_bytes(b"weights")
    assert await concepts.remove_orphan_files() == 0  # its job is still running: leave it alone
    assert not await concepts.mark_ready(concept.id, str(out / "lora.safetensors"), None)
    assert not out.exists()

    out.mkdir(parents=True)
    await ledger.confirm_cancelled(job.id)
    assert await concepts.remove_orphan_files() == 1 and not out.exists()


async def test_a_training_that_ends_badly_leaves_its_concept_failed(concepts, ledger):
    outcomes = {}
    for token, end in [("aaa", "fail"), ("bbb", "cancel"), ("ccc", "succeed")]:
        concept = await concepts.create(GUILD, ALICE, token, "man")
        job = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": concept.id})
        await concepts.attach_job(concept.id, job.id)
        await ledger.claim(job.id)
        if end == "fail":
            await ledger.fail(job.id, "The GPU ran out of memory.")
        elif end == "cancel":
            await ledger.cancel(job.id, ALICE)
            await ledger.confirm_cancelled(job.id)
        else:
            await ledger.succeed(job.id, {"lora": "x"}, 1.0)
            await concepts.mark_ready(concept.id, "x", "y")
        outcomes[token] = await concepts.get(concept.id)
    assert (outcomes["aaa"].status, outcomes["aaa"].error) == ("failed", "The GPU ran out of memory.")
    assert (outcomes["bbb"].status, outcomes["bbb"].error) == ("failed", "The training was cancelled.")
    assert (outcomes["ccc"].status, outcomes["ccc"].lora_path, outcomes["ccc"].lora_kohya_path) == ("ready", "x", "y")


async def test_stale_files_from_a_lost_database_are_not_inherited(concepts, settings):
    stale = settings.data_dir / "concepts" / "1" / "photos"
    stale.mkdir(parents=True)
    (stale / "000.png").write_bytes(b"someone else")
    concept = await concepts.create(GUILD, ALICE, "sid", "man")
    assert concept.id == 1 and list(concepts.concept_dir(1).iterdir()) == []
