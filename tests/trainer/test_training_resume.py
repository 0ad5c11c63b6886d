"""Slices and resume: a training cut into slices, resumed by new calls (even on a freshly loaded pipeline, as after
a worker restart), gives exactly the LoRA of an uninterrupted run with the same seed."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.trainer.training_helpers import make_spec, write_noise_photos
from trainer.training import checkpoint
from trainer.models.loading import load_pipeline
from trainer.training.engine import TrainSpec, train_concept

STEPS = 5


def _params(photos, out_dir) -> dict:
    """What the bot stores and the worker sends again for every slice."""
    spec = make_spec(photos, out_dir, steps=STEPS, flip=True)
    return {**{k: getattr(spec, k) for k in ("concept_id", "token", "class_name", "style", "steps", "seed",
                                              "train_text_encoder", "resolution", "class_images", "sample_count",
                                              "rank", "flip")},
            "photos_dir": str(photos), "out_dir": str(out_dir), "slice_s": 1e-9}


def test_sliced_training_resumes_from_checkpoints_and_equals_an_uninterrupted_run(
        tiny_pipeline, tiny_model_dir, tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", steps=STEPS, flip=True),
                          cache_dir=cache)
    assert whole.status == "done"

    # Slices of one step each (a slice always makes progress); the first on the shared pipeline, the rest on a
    # pipeline loaded afresh, through a new TrainSpec each time.
    restarted = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    outcomes, steps_seen = [], []
    for pipe in [tiny_pipeline] + [restarted] * (STEPS + 2):
        spec = TrainSpec.from_params(_params(photos, tmp_path / "sliced"))
        outcome = train_concept(pipe, spec, cache_dir=cache, on_progress=lambda i: steps_seen.append(i.step))
        outcomes.append(outcome)
        if outcome.status == "paused":
            state = torch.load(checkpoint.checkpoint_dir(spec.out_dir) / checkpoint.STATE_FILE, weights_only=True)
            assert state["step"] == outcome.step and {"lora", "optimizer", "noise_rng", "rng"} <= set(state)
        if outcome.status == "done":
            break
    assert [o.status for o in outcomes] == ["paused"] * (STEPS - 1) + ["done"]
    assert not checkpoint.checkpoint_dir(tmp_path / "sliced").exists()  # removed once the training finished
    assert [o.step for o in outcomes] == list(range(1, STEPS + 1))  # the step counter continues across slices
    assert [s for s in steps_seen if s] == list(range(1, STEPS + 1)) + [STEPS]  # last: the samples stage

    a, b = load_file(whole.result["lora"]), load_file(outcomes[-1].result["lora"])
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert load_file(whole.result["lora_kohya"]).keys() == load_file(outcomes[-1].result["lora_kohya"]).keys()


def test_a_checkpoint_of_another_training_is_ignored(tiny_pipeline, tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 2)
    out = tmp_path / "out"
    paused = train_concept(tiny_pipeline, make_spec(photos, out, steps=4, seed=1), cache_dir=tmp_path / "cache",
                           slice_s=1e-9)
    assert (paused.status, paused.step) == ("paused", 1)
    # Same folder, different seed: starts from step 0 rather than continuing someone else's state.
    events = []
    other = train_concept(tiny_pipeline, make_spec(photos, out, steps=4, seed=2), cache_dir=tmp_path / "cache",
                          slice_s=1e-9, on_progress=events.append)
    assert (other.status, other.step) == ("paused", 1)
    assert [e.step for e in events if e.stage == "training"] == [1]
