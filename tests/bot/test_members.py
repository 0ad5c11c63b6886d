"""Gallery ownership and /forget: a member's rows and files go, nobody else's, and bans stay."""
from __future__ import annotations

import pytest

from bot.services.members import forget_member

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 333333333333333333
ALICE, BOB, ADMIN = 1001, 1002, 9009


async def imagine_done(ledger, gallery, settings, owner, guild, prompt="a dog"):
    job = await ledger.submit("imagine", owner, guild, CHANNEL, {"prompt": prompt})
    await ledger.claim(job.id)
    out = settings.data_dir / "images" / str(job.id)
    out.mkdir(parents=True)
    paths = []
    for i in range(2):
        (out / f"{i:03d}.png").write_bytes(b"png")
        paths.append(str(out / f"{i:03d}.png"))
    (settings.data_dir / "previews").mkdir(exist_ok=True)
    (settings.data_dir / "previews" / f"{job.id}.webp").write_bytes(b"webp")
    await ledger.succeed(job.id, {"images": paths}, 1.0)
    await gallery.add(job.id, owner, guild, paths, [7, 8], prompt)
    return job


async def images_of(store, job_id):
    return await store.fetchall("SELECT * FROM images WHERE job_id = ? ORDER BY id", (job_id,))


async def test_gallery_records_who_owns_each_image(ledger, gallery, settings, clock, store):
    job = await imagine_done(ledger, gallery, settings, ALICE, GUILD)
    images = await images_of(store, job.id)
    assert [(i["owner_id"], i["guild_id"], i["seed"], i["prompt"]) for i in images] == [(ALICE, GUILD, 7, "a dog"),
                                                                                      (ALICE, GUILD, 8, "a dog")]
    assert images[0]["path"].endswith("images/%d/000.png" % job.id) and images[0]["created_at"] == clock.now
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        await gallery.add(job.id, ALICE, GUILD, ["a", "b"], [1], "x")
    await gallery.add(job.id, ALICE, GUILD, ["c"], [], "x")
    assert (await images_of(store, job.id))[-1]["seed"] is None


async def test_forget_member_removes_their_rows_and_files_only(ledger, gallery, concepts, admin, settings, store):
    mine = await concepts.create(GUILD, ALICE, "sid", "man")
    (concepts.concept_dir(mine.id) / "photos").mkdir()
    deleted_earlier = await concepts.create(GUILD, ALICE, "old", "man")
    await concepts.delete(deleted_earlier.id, ALICE)
    train = await ledger.submit("train", ALICE, GUILD, CHANNEL, {"concept_id": mine.id})
    await concepts.attach_job(mine.id, train.id)
    done = await imagine_done(ledger, gallery, settings, ALICE, GUILD)
    running = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(running.id)
    queued = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await admin.ban(ADMIN, GUILD, ALICE, "spam")

    bobs_concept = await concepts.create(GUILD, BOB, "bobby", "man")
    bobs_job = await imagine_done(ledger, gallery, settings, BOB, GUILD)
    alice_elsewhere = await imagine_done(ledger, gallery, settings, ALICE, OTHER_GUILD)

    counts = await forget_member(store, settings.data_dir, GUILD, ALICE)
    assert counts == {"concepts": 1, "images": 2, "jobs": 3, "files": 3, "still_running": 1}
    # files: the concept directory, and the images directory and preview of `done` (queued/train had none)
    assert not concepts.concept_dir(mine.id).exists()
    assert not (settings.data_dir / "images" / str(done.id)).exists()
    assert not (settings.data_dir / "previews" / f"{done.id}.webp").exists()
    for job in (train, done, queued):
        assert await ledger.get(job.id) is None
    still = await ledger.get(running.id)
    assert still.status == "running" and still.cancel_requested
    assert await store.fetchval("SELECT COUNT(*) FROM concepts WHERE owner_id = ? AND guild_id = ?",
                                (ALICE, GUILD)) == 0
    assert await store.fetchval("SELECT COUNT(*) FROM members WHERE member_id = ? AND guild_id = ?",
                                (ALICE, GUILD)) == 0
    assert [ban["member_id"] for ban in await admin.bans(GUILD)] == [ALICE]  # not escapable by /forget

    # everyone else's, and Alice's on another server, untouched
    assert await concepts.get(bobs_concept.id) is not None and concepts.concept_dir(bobs_concept.id).is_dir()
    assert len(await images_of(store, bobs_job.id)) == 2
    assert (settings.data_dir / "images" / str(bobs_job.id)).is_dir()
    assert len(await images_of(store, alice_elsewhere.id)) == 2

    # once the running job has ended, a second /forget takes it too
    await ledger.confirm_cancelled(running.id)
    again = await forget_member(store, settings.data_dir, GUILD, ALICE)
    assert again == {"concepts": 0, "images": 0, "jobs": 1, "files": 0, "still_running": 0}
    assert await ledger.get(running.id) is None
