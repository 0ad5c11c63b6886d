"""The safety switch per job, on the real worker code and real generation on the tiny model: a job with safety on
has its images checked by the model's own safety checker (loaded the first time a job asks), a job with it off in
the same worker is not; a model without a checker refuses safety-on jobs with a message, never runs them unfiltered."""
from __future__ import annotations

import io
import json
import shutil

import pytest

from trainer.contract import protocol
from trainer.contract.imagine_request import NO_SAFETY_CHECKER
from trainer.generation import safety
from trainer.worker import SAFETY_CHECKER_FAILED, EventWriter, JobControl, Worker


def add_tiny_safety_checker(model_dir, *, flag_everything: bool) -> None:
    """A tiny random StableDiffusionSafetyChecker saved into the model folder, its thresholds set so that it flags
    every image (or none): what it decides does not depend on the random weights."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # a score is cosine (-1..1) minus the threshold: -2 flags always, 2 never
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(model_dir / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        model_dir / "feature_extractor")
    index = json.loads((model_dir / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (model_dir / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def model_with_checker(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-with-checker") / "model"
    shutil.copytree(tiny_model_dir, directory)
    add_tiny_safety_checker(directory, flag_everything=True)
    return directory


def make_worker(model_dir, tmp_path) -> Worker:
    from trainer.models.loading import load_pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", dtype="fp32")  # as the worker loads it: no checker
    return Worker(EventWriter(io.BytesIO()), JobControl(), pipe=pipe, device="cpu", model=str(model_dir),
                  data_dir=tmp_path)


def imagine(worker, tmp_path, job_id: int, *, safety_on: bool) -> dict:
    params = {"prompt": "a photo of a dog", "steps": 2, "seed": 3, "out_dir": str(tmp_path / str(job_id)),
              "safety": safety_on}
    return worker._run_one(job_id, protocol.JobKind.IMAGINE, params)


def test_the_worker_checks_images_only_for_jobs_with_safety_on(model_with_checker, tmp_path):
    worker = make_worker(model_with_checker, tmp_path)
    assert safety.checker_source(str(model_with_checker)) == str(model_with_checker)
    assert not safety.has_checker(worker.pipe)  # not loaded until a job asks for it

    off = imagine(worker, tmp_path, 1, safety_on=False)
    assert off["event"] == "done" and len(off["result"]["images"]) == 1 and off["result"]["blocked"] == []

    on = imagine(worker, tmp_path, 2, safety_on=True)
    assert on["event"] == "done", on
    assert on["result"]["images"] == [] and on["result"]["blocked"] == [0]
    assert "The safety filter hid image 1." in on["result"]["notices"]
    assert safety.has_checker(worker.pipe)

    again_off = imagine(worker, tmp_path, 3, safety_on=False)  # the same resident pipeline, the other choice
    assert len(again_off["result"]["images"]) == 1 and again_off["result"]["blocked"] == []


def test_a_model_without_a_checker_refuses_safety_on_jobs(tiny_model_dir, tmp_path):
    worker = make_worker(tiny_model_dir, tmp_path)
    assert safety.checker_source(str(tiny_model_dir)) is None
    refused = imagine(worker, tmp_path, 1, safety_on=True)
    assert refused["event"] == "failed" and refused["error"] == NO_SAFETY_CHECKER
    assert not (tmp_path / "1").exists() or not any((tmp_path / "1").glob("*.png"))
    assert imagine(worker, tmp_path, 2, safety_on=False)["event"] == "done"


def test_a_checker_that_cannot_be_loaded_is_explained_once(model_with_checker, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(model_with_checker, broken)
    for weights in (broken / "safety_checker").glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    worker = make_worker(broken, tmp_path)
    first = imagine(worker, tmp_path, 1, safety_on=True)
    assert first["event"] == "failed" and first["error"].startswith(SAFETY_CHECKER_FAILED.split("(")[0])
    assert "/queue admin safety state:off" in first["error"]
    assert imagine(worker, tmp_path, 2, safety_on=True)["error"] == first["error"]  # not loaded again per job
