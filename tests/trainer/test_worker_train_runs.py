"""A training job in the real Worker, in-process on the tiny model: one log line per run says where it went on from
and what its setup and its steps cost (and the phase it paused in), and a training that yields while making its
class images stays resident and leaves the generation service's memory (its CUDA graphs, on a GPU) alone: only adding
the adapters needs that memory."""
from __future__ import annotations

from trainer.contract import protocol
from trainer.generation.service import GenerationService
from trainer.worker import EventWriter, JobControl, Worker

from tests.trainer.test_worker_run_many import Events
from tests.trainer.training_helpers import CLASS_STEPS, write_noise_photos

JOB = 9


def _params(tmp_path) -> dict:
    return {"concept_id": "c1", "token": "squidarth", "class_name": "man", "steps": 2, "seed": 7, "resolution": 32,
            "class_images": 4, "sample_count": 0, "rank": 4, "photos_dir": str(write_noise_photos(tmp_path / "p", 2)),
            "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}


def _run(worker, control, events, params, *, someone_waits: bool) -> dict:
    message = protocol.run(JOB, "train", params)
    control.register(message)
    if someone_waits:
        control.request_yield(JOB)
    try:
        worker.run_job(JOB, "train", params)
    finally:
        control.ended(JOB)
    return events.events[-1]


def test_a_training_yielding_in_its_class_images_keeps_generation_memory_and_each_run_is_logged(
        tiny_pipeline, tiny_model_dir, tmp_path, capfd):
    events, control = Events(), JobControl()
    control.loading = False
    worker = Worker(EventWriter(events), control, pipe=tiny_pipeline, device="cpu", model=str(tiny_model_dir),
                    data_dir=tmp_path)
    worker.generation = GenerationService(tiny_pipeline, model_name="tiny")
    releases = []
    real_release = worker.generation.release_memory
    worker.generation.release_memory = lambda: releases.append(True) or real_release()
    params = _params(tmp_path)

    paused = _run(worker, control, events, params, someone_waits=True)
    assert (paused["event"], paused["step"]) == ("paused", 0)  # yielded after the first step of class images
    assert releases == []  # /imagine's graphs were not freed for class images
    log = capfd.readouterr().err
    assert f"worker: job {JOB}: started at step 0; setup " in log
    assert f"paused in class images 0/4, the next batch at sampler step 1/{CLASS_STEPS}" in log

    done = _run(worker, control, events, params, someone_waits=False)
    assert done["event"] == "done"
    assert len(releases) == 2  # before the adapters, and after the training gave the UNet back
    log = capfd.readouterr().err
    assert f"worker: job {JOB}: resumed from memory at step 0; setup " in log and "steps 2 in " in log
    assert "done at step 2/2" in log
