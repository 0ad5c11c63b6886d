"""`run_many` in the worker, in-process on the tiny model: the real JobControl queue, Worker.serve and events.

Several /imagine jobs go to GenerationService.imagine_many in one call; each job gets exactly one end event.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.contract import protocol
from trainer.models.loading import load_pipeline
from trainer.worker import EventWriter, JobControl, Worker

STEPS = 3  # previews at steps 1 and 2 (trainer.generation.service.preview_interval)


class Events:
    """The stream EventWriter writes to: decoded events, and a hook the test uses to act mid-run."""

    def __init__(self):
        self.events: list[dict] = []
        self.on_event = None
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            event = protocol.decode(line)
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)
        return len(data)

    def flush(self) -> None:
        pass

    def ends(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for event in self.events:
            if event["event"] in protocol.TERMINAL_EVENTS:
                out.setdefault(event["job_id"], []).append(event)
        return out


@pytest.fixture(scope="module")
def resident_worker(tiny_model_dir, tmp_path_factory):
    """One worker with its own pipeline (its service adds adapters) for the module, as in production."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    worker = Worker(EventWriter(Events()), JobControl(), pipe=pipe, device="cpu", model=str(tiny_model_dir),
                    data_dir=tmp_path_factory.mktemp("worker-data"))
    worker.imagine_request({"prompt": "", "out_dir": "unused"})  # the resident GenerationService exists
    worker.generation.preview_min_interval_s = 0.0  # a preview at every preview step, however fast the run
    return worker


@pytest.fixture
def worker(resident_worker):
    resident_worker.events = Events()
    resident_worker.writer = EventWriter(resident_worker.events)
    return resident_worker


def job(job_id: int, tmp_path: Path, **params) -> dict:
    out = tmp_path / "images" / str(job_id)
    return {"job_id": job_id, "kind": "imagine", "params": {
        "prompt": "a photo of a dog", "seed": job_id, "steps": STEPS, "width": 64, "height": 64, "out_dir": str(out),
        "job_id": job_id, "preview_path": str(tmp_path / "previews" / f"{job_id}.webp"), **params}}


def serve(worker: Worker, jobs: list[dict]) -> None:
    """What the stdin reader does with a run_many line, then the worker's own loop until the queue ends."""
    worker.control.submit(protocol.decode(protocol.encode(protocol.run_many(jobs))))
    worker.control.jobs.put(None)
    worker.serve()


def test_three_compatible_jobs_share_one_batch_and_each_gets_its_images_and_only_its_previews(worker, tmp_path,
                                                                                              capfd):
    serve(worker, [job(1, tmp_path), job(2, tmp_path, count=2), job(3, tmp_path, prompt="a photo of a man")])

    ends = worker.events.ends()
    assert sorted(ends) == [1, 2, 3] and all(len(e) == 1 and e[0]["event"] == "done" for e in ends.values())
    for job_id, count in ((1, 1), (2, 2), (3, 1)):
        images = ends[job_id][0]["result"]["images"]
        assert len(images) == count and all(Path(p).is_file() for p in images)
        assert all(Path(p).parent == tmp_path / "images" / str(job_id) for p in images)
    for job_id in (1, 2, 3):  # the shared loop's progress reached every job, through the last step
        steps = [e["step"] for e in worker.events.events if e["event"] == "progress" and e["job_id"] == job_id]
        assert steps and steps[-1] == STEPS
    assert "3 imagine job(s) in one batch: 1, 2, 3" in capfd.readouterr().err
    # A preview shows the loop's first request's rows: it goes to that job alone, never to another member's.
    previews = {e["job_id"]: e["preview"] for e in worker.events.events
                if e["event"] == "progress" and e["preview"] is not None}
    assert previews == {1: str(tmp_path / "previews" / "1.webp")}


def test_a_missing_lora_fails_only_its_own_job_with_its_message(worker, tmp_path):
    gone = {"concept_id": 9, "token": "sid", "class_name": "man", "lora_path": str(tmp_path / "deleted.safetensors"),
            "weight": 1.0}
    serve(worker, [job(1, tmp_path, steps=1), job(2, tmp_path, prompt="a photo of sid", concepts=[gone]),
                   job(3, tmp_path, steps=1)])

    ends = worker.events.ends()
    assert [ends[j][0]["event"] for j in (1, 2, 3)] == ["done", "failed", "done"]
    assert all(len(e) == 1 for e in ends.values())
    assert "LoRA file for sid is missing" in ends[2][0]["error"]


def test_a_bad_option_in_one_job_fails_that_job_before_the_batch(worker, tmp_path):
    serve(worker, [job(1, tmp_path, steps=1000), job(2, tmp_path, steps=1)])

    ends = worker.events.ends()
    assert ends[1][0]["event"] == "failed" and "Steps must be from 1 to 100" in ends[1][0]["error"]
    assert ends[2][0]["event"] == "done"


def test_a_job_cancelled_mid_batch_is_cancelled_and_the_others_finish(worker, tmp_path):
    def cancel_two_at_its_first_step(event):
        if event["event"] == "progress" and event["job_id"] == 2 and event["step"] == 1:
            worker.control.cancel(2)

    worker.events.on_event = cancel_two_at_its_first_step
    serve(worker, [job(1, tmp_path, steps=2), job(2, tmp_path, steps=2), job(3, tmp_path, steps=2)])

    ends = worker.events.ends()
    assert [ends[j][0]["event"] for j in (1, 2, 3)] == ["done", "cancelled", "done"]
    assert all(len(e) == 1 for e in ends.values())
    assert not list((tmp_path / "images" / "2").glob("*.png"))  # its images were made, then dropped


def test_cancelling_every_job_stops_the_batch_early(worker, tmp_path):
    def cancel_all_at_step_one(event):
        if event["event"] == "progress" and event["step"] == 1:
            worker.control.cancel(event["job_id"])

    worker.events.on_event = cancel_all_at_step_one
    serve(worker, [job(1, tmp_path, steps=10), job(2, tmp_path, steps=10)])

    ends = worker.events.ends()
    assert [ends[j][0]["event"] for j in (1, 2)] == ["cancelled", "cancelled"]
    steps = [e["step"] for e in worker.events.events if e["event"] == "progress"]
    assert max(steps) < 10


def test_a_job_cancelled_before_the_batch_starts_never_runs(worker, tmp_path):
    message = protocol.run_many([job(1, tmp_path), job(2, tmp_path, steps=1)])
    worker.control.submit(message)
    worker.control.cancel(1)
    worker.control.jobs.put(None)
    worker.serve()

    ends = worker.events.ends()
    assert ends[1][0]["event"] == "cancelled" and ends[2][0]["event"] == "done"
    assert not any(e["event"] == "progress" and e["job_id"] == 1 for e in worker.events.events)

