"""Files across the Ray boundary, without Ray: the actor's work directory and cache (trainer/remote/) and the bot's
side (bot/dispatch/ray_files.py), on real files in tmp_path."""
from __future__ import annotations

import os

import pytest

from bot.dispatch.ray_files import FileHashes, input_files, write_returned
from trainer.contract import protocol
from trainer.remote.blobs import BlobStore, sha256_of
from trainer.remote.workdir import WorkDir, rewrite_paths


def test_paths_are_rewritten_everywhere_in_a_result_keys_included():
    result = {"images": ["/bot/data/images/7/000.png"], "small": {"/bot/data/images/7/000.png": "/bot/data/x.webp"},
              "grid": None, "parameters": "a /bot/data path inside text stays", "seed": 3, "other": "/bot/database"}
    moved = rewrite_paths(result, "/bot/data", "/actor/work")
    assert moved == {"images": ["/actor/work/images/7/000.png"],
                     "small": {"/actor/work/images/7/000.png": "/actor/work/x.webp"},
                     "grid": None, "parameters": "a /bot/data path inside text stays", "seed": 3,
                     "other": "/bot/database"}


def test_a_training_sends_its_photos_and_checkpoint_an_imagine_its_loras_and_init_image(tmp_path):
    concept = tmp_path / "concepts" / "4"
    (concept / "photos").mkdir(parents=True)
    (concept / "photos" / "000.png").write_bytes(b"p0")
    (concept / "photos" / "000.txt").write_bytes(b"caption")
    (concept / "checkpoint").mkdir()
    (concept / "checkpoint" / "state.pt").write_bytes(b"state")
    (concept / "lora.safetensors").write_bytes(b"an older lora: not an input of its own training")
    train = protocol.run(1, "train", {"photos_dir": str(concept / "photos"), "out_dir": str(concept)})
    assert input_files(train) == [concept / "photos" / "000.png", concept / "photos" / "000.txt",
                                  concept / "checkpoint" / "state.pt"]
    init = tmp_path / "init.png"
    init.write_bytes(b"init")
    lora = concept / "lora.safetensors"
    imagine = protocol.run_many([
        {"job_id": 2, "kind": "imagine", "params": {"concepts": [{"lora_path": str(lora)}], "init_image": None}},
        {"job_id": 3, "kind": "imagine", "params": {"concepts": [{"lora_path": str(lora)}], "init_image": str(init)}},
    ])
    assert input_files(imagine) == [lora, init]  # the LoRA both use goes once
    assert input_files(protocol.run(4, "selftest", {"seconds": 1})) == []


def test_the_work_directory_returns_what_the_run_made_and_the_inputs_it_removed(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    photo, state = b"photo bytes", b"checkpoint of slice 1"
    blobs.put(sha256_of(photo), photo)
    blobs.put(sha256_of(state), state)
    work = WorkDir(tmp_path / "work", "/bot/data")
    work.materialise({"concepts/4/photos/000.png": sha256_of(photo),
                      "concepts/4/checkpoint/state.pt": sha256_of(state)}, blobs)
    params = work.to_actor({"photos_dir": "/bot/data/concepts/4/photos", "out_dir": "/bot/data/concepts/4"})
    assert params["photos_dir"] == str(tmp_path / "work" / "concepts/4/photos")
    assert (tmp_path / "work" / "concepts/4/photos/000.png").read_bytes() == photo

    out = tmp_path / "work" / "concepts" / "4"
    (out / "checkpoint" / "state.pt").unlink()  # the training finished: its checkpoint goes
    (out / "lora.safetensors").write_bytes(b"the lora")
    (out / "checkpoint" / ".state.pt.1.2.tmp").write_bytes(b"half a write")
    changed, deleted = work.changes()
    assert sorted(changed) == ["concepts/4/lora.safetensors"]
    assert deleted == ["concepts/4/checkpoint/state.pt"]
    assert blobs.path(sha256_of(state)).read_bytes() == state  # the cached copy is untouched

    bot_root = tmp_path / "bot"
    (bot_root / "concepts/4/checkpoint").mkdir(parents=True)
    (bot_root / "concepts/4/checkpoint/state.pt").write_bytes(state)
    hashes = FileHashes()
    written = write_returned(bot_root, {"concepts/4/lora.safetensors": {"sha": sha256_of(b"the lora"),
                                                                         "data": b"the lora"}}, deleted, hashes)
    assert written == len(b"the lora")
    assert (bot_root / "concepts/4/lora.safetensors").read_bytes() == b"the lora"
    assert not (bot_root / "concepts/4/checkpoint").exists()  # the folder too, as the engine removes it
    assert hashes.sha(bot_root / "concepts/4/lora.safetensors") == sha256_of(b"the lora")


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "images/../../x"])
def test_no_file_is_placed_or_written_outside_the_data_directory(tmp_path, rel):
    blobs = BlobStore(tmp_path / "blobs")
    blobs.put(sha256_of(b"x"), b"x")
    with pytest.raises(ValueError):
        WorkDir(tmp_path / "work", "/bot/data").materialise({rel: sha256_of(b"x")}, blobs)
    with pytest.raises(ValueError):
        write_returned(tmp_path / "bot", {rel: {"sha": sha256_of(b"x"), "data": b"x"}}, [], FileHashes())


def test_bytes_that_do_not_match_their_hash_are_refused_and_the_cache_stays_under_its_size(tmp_path):
    blobs = BlobStore(tmp_path / "blobs", limit_bytes=10)
    with pytest.raises(ValueError):
        blobs.put(sha256_of(b"one"), b"two")
    blobs.put(sha256_of(b"aaaaaa"), b"aaaaaa")
    os.utime(blobs.path(sha256_of(b"aaaaaa")), (1, 1))  # used long ago
    blobs.put(sha256_of(b"bbbbbb"), b"bbbbbb")  # 12 bytes in all: the older one goes
    assert blobs.missing([sha256_of(b"aaaaaa"), sha256_of(b"bbbbbb")]) == [sha256_of(b"aaaaaa")]
