"""`generate_pausable` on both families' tiny pipelines: a batch paused between any two sampler steps (or before its
decode) and gone on with gives exactly the images of an uninterrupted batch, each step made once; a paused batch
goes on only as the batch it was."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.training.images import PausedBatch, generate, generate_pausable

STEPS, SIDE, SEEDS = 6, 32, [11, 12]


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def _count_unet_calls(pipe) -> tuple[list, object]:
    calls = []
    return calls, pipe.unet.register_forward_hook(lambda module, args, output: calls.append(True))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_batch_paused_at_every_step_gives_the_uninterrupted_images(family, tiny_pipeline, tiny_sdxl_pipeline):
    pipe = tiny_pipeline if family == "sd1" else tiny_sdxl_pipeline
    whole = _pixels(generate(pipe, "a photo of a dog", SEEDS, SIDE, steps=STEPS))

    calls, hook = _count_unet_calls(pipe)
    paused, runs = None, 0
    try:
        while True:
            result = generate_pausable(pipe, "a photo of a dog", SEEDS, SIDE, steps=STEPS, should_pause=lambda: True,
                                       paused=paused)
            runs += 1
            if not isinstance(result, PausedBatch):
                break
            assert result.steps_done == runs  # one step a call: each call makes at least one
            paused = result
    finally:
        hook.remove()
    assert runs == STEPS + 1 and len(calls) == STEPS  # no step made twice; the last call only decodes
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(result), whole))


def test_a_paused_batch_goes_on_only_as_itself(tiny_pipeline):
    paused = generate_pausable(tiny_pipeline, "a photo of a dog", SEEDS, SIDE, steps=STEPS,
                               should_pause=lambda: True)
    assert isinstance(paused, PausedBatch) and paused.steps_done == 1
    for other in (dict(prompt="a photo of a cat"), dict(seeds=[11, 13]), dict(resolution=64)):
        call = dict(prompt="a photo of a dog", seeds=SEEDS, resolution=SIDE) | other
        with pytest.raises(ValueError, match="another batch"):
            generate_pausable(tiny_pipeline, call["prompt"], call["seeds"], call["resolution"], steps=STEPS,
                              paused=paused)


def test_the_pipeline_keeps_its_own_scheduler(tiny_pipeline):
    scheduler = tiny_pipeline.scheduler
    generate_pausable(tiny_pipeline, "a photo of a dog", SEEDS, SIDE, steps=STEPS, should_pause=lambda: True)
    assert tiny_pipeline.scheduler is scheduler


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_with_the_deep_cache_a_paused_batch_keeps_its_feature_and_gives_the_uninterrupted_images(
        family, tiny_pipeline, tiny_sdxl_pipeline):
    """The samples' deep cache (trainer/generation/deep_cache.py): a batch paused after a whole step goes on with the
    head from that step's feature, as the uninterrupted batch does, not with a whole forward of its own."""
    pipe = tiny_pipeline if family == "sd1" else tiny_sdxl_pipeline
    whole = _pixels(generate_pausable(pipe, "a photo of a dog", SEEDS, SIDE, steps=STEPS, deep_cache_every=3))
    every_step = _pixels(generate(pipe, "a photo of a dog", SEEDS, SIDE, steps=STEPS))
    assert not np.array_equal(whole[0], every_step[0])  # the heads ran
    paused, runs, wholes = None, 0, []
    while True:
        result = generate_pausable(pipe, "a photo of a dog", SEEDS, SIDE, steps=STEPS, should_pause=lambda: True,
                                   paused=paused, deep_cache_every=3)
        runs += 1
        if not isinstance(result, PausedBatch):
            break
        wholes.append(result.reuse.counts["whole"])
        paused = result
    assert runs == STEPS + 1 and wholes[-1] == 2  # steps 0 and 3 whole, across six calls
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(result), whole))
