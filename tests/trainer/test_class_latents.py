"""A class-image set's latents are encoded a chunk at a time (trainer/training/priors.py): someone waiting for the
GPU waits for one chunk, not for the whole set's VAE pass, and the set's latents are those of one pass."""
from __future__ import annotations

import torch

from trainer.training import data, priors
from trainer.training.data import encode_latents, load_pixels
from trainer.training.engine import class_prompt
from trainer.training.priors import ClassImageSet, model_fingerprint

COUNT, SIDE, CHUNK, STEPS = 20, 32, 8, 2  # chunks of 8, 8 and 4 images


def test_the_latents_pause_between_chunks_and_equal_one_pass(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(priors, "LATENT_CHUNK", CHUNK)
    class_set = ClassImageSet.for_model(tmp_path, model_fingerprint(tiny_pipeline), class_prompt("dog"), SIDE, COUNT,
                                        STEPS)
    someone_waits = []
    status = class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False,
                              should_yield=lambda: bool(someone_waits),
                              on_image=lambda done, count: someone_waits.append(True))
    assert status == "paused" and not class_set.missing()  # the images, then one chunk of latents
    assert class_set.latents_encoded() == f"{CHUNK}/{COUNT}"
    calls = 1
    while status != "complete":
        status = class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False,
                                  should_yield=lambda: True)
        calls += 1
    assert calls == 3  # one chunk a call
    assert class_set.complete and not (class_set.directory / priors.LATENT_PARTS).exists()

    mean, std = class_set.latents()
    expected_mean, expected_std = encode_latents(
        tiny_pipeline.vae, load_pixels([class_set.image_path(i) for i in range(COUNT)], SIDE))
    assert mean.shape == expected_mean.shape == (2, COUNT, *expected_mean.shape[2:])
    assert torch.equal(mean, expected_mean) and torch.equal(std, expected_std)


def test_a_stop_between_chunks_cancels_and_the_next_call_goes_on(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(priors, "LATENT_CHUNK", CHUNK)
    class_set = ClassImageSet.for_model(tmp_path, model_fingerprint(tiny_pipeline), class_prompt("cat"), SIDE, COUNT,
                                        STEPS)
    stop = []
    status = class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: bool(stop),
                              on_image=lambda done, count: stop.append(True))
    assert status == "cancelled" and class_set.latents_encoded() == f"0/{COUNT}"
    assert class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False) == "complete"
    assert class_set.latents_encoded() == f"{COUNT}/{COUNT}"


def test_another_worker_finishing_the_same_set_meanwhile_leaves_one_complete_set(tiny_pipeline, tmp_path,
                                                                                monkeypatch):
    """Two idle GPUs prefill the same classes: one finishes the set and clears its latent parts while the other is
    between two chunks of it."""
    monkeypatch.setattr(priors, "LATENT_CHUNK", CHUNK)
    key = (tmp_path, model_fingerprint(tiny_pipeline), class_prompt("man"), SIDE, COUNT, STEPS)
    mine = ClassImageSet.for_model(*key)
    assert mine.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False,
                       should_yield=lambda: True) == "paused"  # the images and the first chunk
    real_encode, raced = data.encode_latents, []

    def the_other_worker_finishes_first(vae, pixels):
        if not raced:
            raced.append(True)
            theirs = ClassImageSet.for_model(*key)
            assert theirs.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False) == \
                "complete"
        return real_encode(vae, pixels)

    monkeypatch.setattr(data, "encode_latents", the_other_worker_finishes_first)
    assert mine.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False) == "complete"
    assert raced and mine.complete and not (mine.directory / priors.LATENT_PARTS).exists()
    mean, _ = mine.latents()
    assert torch.equal(mean, real_encode(tiny_pipeline.vae, load_pixels([mine.image_path(i) for i in range(COUNT)],
                                                                        SIDE))[0])


def test_parts_of_another_chunk_size_left_by_an_older_run_are_not_taken_for_this_ones(tiny_pipeline, tmp_path,
                                                                                     monkeypatch):
    """A kill between two chunks, then a version with another LATENT_CHUNK: the set's latents are still one pass's."""
    monkeypatch.setattr(priors, "LATENT_CHUNK", 2 * CHUNK)
    class_set = ClassImageSet.for_model(tmp_path, model_fingerprint(tiny_pipeline), class_prompt("boy"), SIDE, COUNT,
                                        STEPS)
    assert class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False,
                            should_yield=lambda: True) == "paused"  # the images and a part of 16
    assert class_set.latents_encoded() == f"{2 * CHUNK}/{COUNT}"
    monkeypatch.setattr(priors, "LATENT_CHUNK", CHUNK)
    assert class_set.latents_encoded() == f"0/{COUNT}"
    assert class_set.ensure(tiny_pipeline, batch_size=COUNT, deadline=None, should_stop=lambda: False) == "complete"
    mean, std = class_set.latents()
    expected_mean, expected_std = encode_latents(
        tiny_pipeline.vae, load_pixels([class_set.image_path(i) for i in range(COUNT)], SIDE))
    assert torch.equal(mean, expected_mean) and torch.equal(std, expected_std)
    assert not (class_set.directory / priors.LATENT_PARTS).exists()
