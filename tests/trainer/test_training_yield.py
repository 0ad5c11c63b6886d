"""A training that yields when someone waits: it pauses at a step boundary, stays resident (adapters, optimiser,
inputs) while /imagine jobs run untouched by it, and goes on from memory to exactly the LoRA of an uninterrupted run.
A periodic crash checkpoint is written while it trains, and a crash resumes from it."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.trainer.training_helpers import CLASS_STEPS, make_spec, pipeline_state, write_noise_photos
from trainer.contract.imagine_request import ImagineRequest
from trainer.generation.service import GenerationService
from trainer.training import checkpoint
from trainer.training.engine import train_concept
from trainer.training.live import LiveTrainings

STEPS = 5
RECIPE = dict(steps=STEPS, flip=True, prior_preservation=False, sample_count=0)
# Resuming from a checkpoint file is bit-identical with prior preservation on (test_training_resume.py); without
# it, it is not, on main too: the tests that resume from the file keep class images on.
FROM_FILE = dict(steps=STEPS, flip=True, sample_count=0)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _imagine(service, out_dir):
    request = ImagineRequest.from_params({"prompt": "a photo of squidarth man", "seed": 3, "steps": 2,
                                          "width": 64, "height": 64, "out_dir": out_dir})
    return [_pixels(p) for p in service.imagine(request).images]


def _same_lora(a_path, b_path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_a_yielded_training_goes_on_from_memory_and_imagine_in_between_is_untouched(tiny_pipeline, tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    service = GenerationService(tiny_pipeline, model_name="tiny")
    untouched = _imagine(service, tmp_path / "before")  # no training at all
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **RECIPE), cache_dir=cache)

    live, asked = LiveTrainings(), []

    def someone_waits_from_the_second_boundary() -> bool:
        asked.append(True)  # asked once the inputs are cached, then at each step boundary after the first step
        return len(asked) >= 3

    spec = make_spec(photos, tmp_path / "yielded", **RECIPE)
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live,
                           should_yield=someone_waits_from_the_second_boundary)
    assert (paused.status, paused.step) == ("paused", 2)
    assert live.held is not None  # resident: adapters, optimiser and inputs kept

    between = _imagine(service, tmp_path / "between")
    assert len(between) == len(untouched) and all(np.array_equal(a, b) for a, b in zip(between, untouched))

    steps = []
    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live,
                         on_progress=lambda info: steps.append(info.step))
    assert done.status == "done" and live.resumed == 1 and live.held is None
    assert steps[0] == 3  # went on from step 2 (the checkpoint file was not needed)
    assert paused.run["from"] == "start" and (done.run["from"], done.run["first_step"], done.run["steps"]) == (
        "memory", 2, STEPS - 2)
    _same_lora(whole.result["lora"], done.result["lora"])
    assert _imagine(service, tmp_path / "after")[0].shape == untouched[0].shape


def test_a_held_training_dropped_leaves_the_pipeline_as_found_and_resumes_from_its_checkpoint(tiny_pipeline,
                                                                                             tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    before = pipeline_state(tiny_pipeline)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **FROM_FILE), cache_dir=cache)
    live = LiveTrainings()
    spec = make_spec(photos, tmp_path / "dropped", **FROM_FILE)
    # The class images are cached: the first run's lasting work is the inputs, then it yields; the second goes on
    # from memory and makes at least one step.
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=lambda: True)
    assert (paused.status, paused.step, paused.run.get("phase")) == ("paused", 0, "adapters")
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=lambda: True)
    assert (paused.status, paused.step, paused.run["from"]) == ("paused", 1, "memory")  # at least one step per run
    assert live.held is not None
    live.drop()  # e.g. another training needs the memory
    assert pipeline_state(tiny_pipeline) == before
    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live)  # from the file written at the yield
    assert done.status == "done" and live.resumed == 1
    _same_lora(whole.result["lora"], done.result["lora"])


class _Crash(Exception):
    pass


def test_a_crash_mid_training_resumes_from_the_periodic_checkpoint(tiny_pipeline, tmp_path):
    """No slices and no yield: only the periodic checkpoint (every step boundary here) saves the work."""
    photos = write_noise_photos(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **FROM_FILE), cache_dir=cache)
    spec = make_spec(photos, tmp_path / "crashed", **FROM_FILE)
    state_file = checkpoint.checkpoint_dir(spec.out_dir) / checkpoint.STATE_FILE

    def crash_at_step_4(info):
        if info.step < 4:
            return
        deadline = time.monotonic() + 60
        while _saved_step(state_file) < 2:  # the background write of an earlier step lands
            assert time.monotonic() < deadline, "no periodic checkpoint was written"
            time.sleep(0.05)
        raise _Crash()

    with pytest.raises(_Crash):
        train_concept(tiny_pipeline, spec, cache_dir=cache, checkpoint_s=0, on_progress=crash_at_step_4)
    saved = _saved_step(state_file)
    assert 2 <= saved < STEPS
    steps = []
    done = train_concept(tiny_pipeline, spec, cache_dir=cache, on_progress=lambda info: steps.append(info.step))
    assert done.status == "done" and steps[0] == saved + 1
    _same_lora(whole.result["lora"], done.result["lora"])


def _saved_step(path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def test_a_held_training_another_lane_went_on_with_resumes_from_the_newer_file(tiny_pipeline, tmp_path):
    """Two lanes: this worker keeps the yielded training, another worker resumes it from the file and trains further
    (a newer checkpoint on disk). When this worker gets the training again, memory is stale: it resumes from the file."""
    photos = write_noise_photos(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    live, asked = LiveTrainings(), []
    spec = make_spec(photos, tmp_path / "yielded", **FROM_FILE)
    # Asked after each sampler step of the class images' batch, once they are made, once the inputs are cached, then
    # at each step boundary after the first.
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live,
                           should_yield=lambda: asked.append(True) or len(asked) >= CLASS_STEPS + 4)
    assert (paused.status, paused.step) == ("paused", 2) and live.held is not None
    live.held.checkpoints.wait()
    state = checkpoint.load_state(spec.out_dir, live.held.job.fingerprint)
    time.sleep(0.01)  # a later write: another lane's checkpoint. It says step 1 so that where the training goes on
    checkpoint.save_state(spec.out_dir, {**state, "step": 1})  # from shows which copy it used (memory says step 2)

    steps = []
    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, on_progress=lambda info: steps.append(info.step))
    assert done.status == "done" and live.held is None
    assert steps[0] == 2  # on from the file's step 1, not from memory's step 2


def test_a_training_asked_to_yield_during_its_class_images_pauses_and_the_next_run_makes_the_rest(tiny_pipeline,
                                                                                                  tmp_path):
    """Someone waits while the class images are still being made, and the training has no `live` to keep a batch
    paused between two sampler steps in (the CLI): it stops at the end of the batch (on CPU: two images a batch),
    keeps the images made so far in the shared cache, and the next run makes only the rest and trains to the LoRA
    of an uninterrupted run. (With `live`, as in the worker: tests/trainer/test_training_yield_setup.py.)"""
    photos = write_noise_photos(tmp_path / "photos", 3)
    recipe = dict(FROM_FILE, class_images=5)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **recipe), cache_dir=tmp_path / "c1")

    cache, asked = tmp_path / "c2", []
    spec = make_spec(photos, tmp_path / "yielded", **recipe)
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, should_yield=lambda: asked.append(True) or True)
    assert (paused.status, paused.step) == ("paused", 0) and asked
    [class_dir] = (cache / "priors").iterdir()
    assert sorted(p.name for p in class_dir.iterdir()) == ["000.png", "001.png"]  # one batch, not yet complete

    made = []
    done = train_concept(tiny_pipeline, spec, cache_dir=cache,
                         on_progress=lambda info: made.append(info.step) if info.stage == "class_images" else None)
    assert done.status == "done"
    assert made == [2, 4, 5]  # went on from the two images on disk
    _same_lora(whole.result["lora"], done.result["lora"])
