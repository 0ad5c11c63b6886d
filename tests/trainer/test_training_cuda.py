"""Training on a CUDA GPU: what the CPU tests cannot show, since CUDA graphs exist only there. Run on the lent H200
(`python -m pytest tests/trainer/test_training_cuda.py`, under a minute); skipped elsewhere."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.training_helpers import make_spec, write_noise_photos
from trainer.models.loading import load_pipeline
from trainer.training.engine import train_concept
from trainer.training.live import LiveTrainings

STEPS = 12


def preview_captures(caplog) -> int:
    """CUDA graphs captured for one image with guidance (2 rows): the previews' shape in these trainings."""
    return sum(1 for r in caplog.records
               if r.name == "trainer.generation.fast_unet" and "captured a UNet CUDA graph for ((2," in r.getMessage())


def test_a_trainings_previews_capture_their_graph_once_and_keep_it_through_a_yield(tiny_model_dir, tmp_path,
                                                                                   caplog):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200)")
    caplog.set_level(logging.INFO, logger="trainer.generation.fast_unet")
    pipe = load_pipeline(str(tiny_model_dir), device="cuda", dtype="bf16")
    photos = write_noise_photos(tmp_path / "photos", 3)
    # Learning rates that move the tiny model's pictures within a few steps, so a stale LoRA would show.
    recipe = dict(steps=STEPS, prior_preservation=False, sample_count=0, learning_rate=1e-2,
                  text_encoder_learning_rate=1e-2)

    def spec(name, every):
        return make_spec(photos, tmp_path / name, preview_path=tmp_path / f"{name}.webp", preview_every=every,
                         **recipe)

    live, steps_done, step_2 = LiveTrainings(), [], []

    def progress(event):
        steps_done.append(event.step)
        if event.preview and not step_2:
            step_2.append(pixels(event.preview))

    often = spec("often", 2)
    first = train_concept(pipe, often, cache_dir=tmp_path / "cache", live=live, on_progress=progress,
                          should_yield=lambda: bool(steps_done) and steps_done[-1] >= 5)
    assert first.status == "paused"
    assert preview_captures(caplog) == 1  # the previews after steps 2 and 4
    done = train_concept(pipe, often, cache_dir=tmp_path / "cache", live=live, should_yield=lambda: False)
    assert done.status == "done" and done.run["from"] == "memory"
    assert preview_captures(caplog) == 1  # after steps 6, 8 and 10 too: the same graph

    # The graph reads the LoRA in place: its last preview (step 10) is the one a fresh capture at step 10 makes.
    once = train_concept(pipe, spec("once", 10), cache_dir=tmp_path / "cache")
    assert once.status == "done" and preview_captures(caplog) == 2
    last = pixels(tmp_path / "often.webp")
    assert np.abs(last - pixels(tmp_path / "once.webp")).max() <= 2
    assert np.abs(last - step_2[0]).mean() > 2  # and the LoRA moved the picture since step 2


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.int16)


def test_a_trainings_samples_capture_their_graphs_once_through_yields(tiny_model_dir, tmp_path, caplog):
    """Samples paused at every sampler step (an /imagine waiting each time) go on with the graphs captured at their
    first step, the whole forward's and the deep cache's head: two captures, not two a run (serving run M: ~0.5 s
    of a /train). The pictures are the uninterrupted training's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200)")
    caplog.set_level(logging.INFO, logger="trainer.generation.fast_unet")
    pipe = load_pipeline(str(tiny_model_dir), device="cuda", dtype="bf16")
    photos = write_noise_photos(tmp_path / "photos", 3)
    recipe = dict(steps=2, prior_preservation=False, sample_count=2, sample_deep_cache=3)

    def sample_captures() -> int:  # two images with guidance: 4 rows
        return sum(1 for r in caplog.records if r.name == "trainer.generation.fast_unet"
                   and "captured a UNet CUDA graph for ((4," in r.getMessage())

    whole = train_concept(pipe, make_spec(photos, tmp_path / "whole", **recipe), cache_dir=tmp_path / "cache")
    assert whole.status == "done" and sample_captures() == 2

    live, stages = LiveTrainings(), []
    spec = make_spec(photos, tmp_path / "yielded", **recipe)
    outcome, runs = None, 0
    while outcome is None or outcome.status == "paused":
        outcome = train_concept(pipe, spec, cache_dir=tmp_path / "cache", live=live,
                                on_progress=lambda progress: stages.append(progress.stage),
                                should_yield=lambda: "samples" in stages)
        runs += 1
    assert outcome.status == "done" and runs > 10  # a run per sampler step
    assert sample_captures() == 4
    for made, reference in zip(outcome.result["samples"], whole.result["samples"], strict=True):
        assert np.abs(pixels(made) - pixels(reference)).max() <= 2
