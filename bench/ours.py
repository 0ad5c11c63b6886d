"""Our engines, driven exactly as the GPU worker drives them: `trainer.worker.Worker.run_job` (one `run`) and
`Worker.run_many` (a batch of /imagine jobs, as the dispatcher sends queued ones) in-process.

The base model is loaded once with `load_pipeline` (the worker's own loader, bf16 + SDPA on a GPU) and stays
resident; every job goes through the worker's job runner, progress reporter and event writer. A training job that
pauses after a slice is sent `run` again, as the bot's dispatcher does.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from trainer.contract import protocol
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE
from bench.timing import sync

CLASS_NAME = "man"
UPLOAD_LIMIT = 10 * 1024 * 1024


class EngineFailed(RuntimeError):
    """A job ended in `failed`; the message carries the worker's error and traceback."""


class _EventSink:
    """The stream the worker's EventWriter writes to: keeps every event, decoded."""

    def __init__(self):
        self.events: list[dict] = []
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        self.events.extend(protocol.decode(line) for line in lines if line.strip())
        return len(data)

    def flush(self) -> None:
        pass


class OursWorker:
    def __init__(self, model_dir: Path, device: str, data_dir: Path, dtype: str = "auto", compile_unet: bool = False,
                 deep_cache: int = DEFAULT_DEEP_CACHE):
        from trainer.models.loading import load_pipeline
        from trainer.worker import EventWriter, JobControl, Worker

        self.device = device
        self.sink = _EventSink()
        self.pipe = load_pipeline(str(model_dir), device, dtype)
        self.worker = Worker(EventWriter(self.sink), JobControl(), pipe=self.pipe, device=device,
                             model=str(model_dir), data_dir=data_dir, compile_unet=compile_unet,
                             deep_cache=deep_cache)
        self._job_ids = itertools.count(1)

    def run(self, kind: str, params: dict) -> tuple[dict, float, int]:
        """Run one job to its end; return (result, wall seconds, slices it took). `self.started_at` = its start."""
        job_id = next(self._job_ids)
        sync(self.device)
        self.started_at = time.time()
        start = time.perf_counter()
        slices = 0
        while True:
            self.worker.run_job(job_id, kind, params)
            slices += 1
            event = next(e for e in reversed(self.sink.events) if e.get("job_id") == job_id
                         and e["event"] in protocol.JOB_END_EVENTS)
            if event["event"] != "paused":
                break
        sync(self.device)
        seconds = time.perf_counter() - start
        if event["event"] != "done":
            raise EngineFailed(f"{kind} job ended {event['event']}: {event.get('error')}\n{event.get('detail', '')}")
        return event["result"], seconds, slices


    def run_many(self, kind: str, params_list: list[dict]) -> tuple[list[dict], float]:
        """Run several jobs as one `run_many` request; return (their results in order, wall seconds)."""
        job_ids = [next(self._job_ids) for _ in params_list]
        message = protocol.run_many([{"job_id": j, "kind": kind, "params": p} for j, p in zip(job_ids, params_list)])
        sync(self.device)
        start = time.perf_counter()
        self.worker.run_many(message["jobs"])
        sync(self.device)
        seconds = time.perf_counter() - start
        ends = {e["job_id"]: e for e in self.sink.events
                if e.get("job_id") in job_ids and e["event"] in protocol.TERMINAL_EVENTS}
        for job_id in job_ids:
            event = ends.get(job_id)
            if event is None or event["event"] != "done":
                what = "no end event" if event is None else f"{event['event']}: {event.get('error')}"
                raise EngineFailed(f"{kind} job {job_id} of a run_many ended with {what}\n"
                                   f"{(event or {}).get('detail', '')}")
        return [ends[job_id]["result"] for job_id in job_ids], seconds


def train_params(concept_id: int, token: str, photos_dir: Path, out_dir: Path, *, steps: int | None,
                 seed: int, class_images: int, batch_size: int | None = None) -> dict:
    """The worker's `train` params, plus `class_images` so that both sides make the same number of priors."""
    params = {"concept_id": concept_id, "token": token, "class_name": CLASS_NAME, "style": False,
              "photos_dir": str(photos_dir), "out_dir": str(out_dir), "steps": steps, "seed": seed, "slice_s": None,
              "train_text_encoder": True, "class_images": class_images}
    if batch_size is not None:
        params["batch_size"] = batch_size
    return params


def train_steps_for(samples: int, batch: int | None = None) -> int:
    """Steps at `batch` (default: our engine's batch size) that show it `samples` instance (and as many prior) samples."""
    import math

    from trainer.contract.train_spec import spec_default

    batch = batch or spec_default("batch_size")
    return math.ceil(samples / batch)


def imagine_params(concepts: list[tuple[int, str, Path]], out_dir: Path, *, steps: int, cfg: float, size: int,
                   seed: int) -> dict:
    """An /imagine request whose prompt names each (concept_id, token, lora_path) concept by its token."""
    tokens = " and ".join(f"{token} {CLASS_NAME}" for _, token, _ in concepts)
    return {
        "prompt": f"a portrait photo of {tokens}", "negative": "", "seed": seed, "steps": steps, "cfg": cfg,
        "width": size, "height": size, "count": 1, "scheduler": None,
        "concepts": [{"concept_id": cid, "token": token, "class_name": CLASS_NAME, "lora_path": str(path),
                      "weight": 1.0} for cid, token, path in concepts],
        "out_dir": str(out_dir), "upload_limit": UPLOAD_LIMIT, "safety": False,
        "blocked_words": [], "init_image": None, "strength": 0.75,
    }


def lora_switch(service, lora_path, label: str = "switch") -> None:
    """What a single /imagine request does around its loop to use one member's LoRA (the bench's "LoRA switch"):
    the service's cache lookup, the LoRA folded into the text encoder(s) and restored, then into the UNet and
    restored."""
    group = ((service.adapters.get(lora_path, label), 1.0),)
    for text_encoder in service.family.text_encoders:
        with service.adapters.folded(text_encoder, group):
            pass
    with service.adapters.folded("unet", group):
        pass
