"""`python -m trainer worker`: the GPU worker process the bot talks to over JSON lines (trainer/contract/protocol.py).

It loads the base model once and keeps it resident, then runs requests one at a time on the main thread: a `run`
(one job) or a `run_many` (several /imagine jobs served by one batched GenerationService.imagine_many call).
A reader thread takes requests from stdin, so a `cancel` or a `yield` reaches a running job at its next step boundary.
A training that yields stays resident (trainer/training/live.py) until it resumes or something else needs the memory.
A `prefill` (the GPU is idle) makes class images until any other request arrives (trainer/training/prefill.py). Events go to
the original stdout; sys.stdout (and file descriptor 1) point at stderr so prints from libraries cannot corrupt the
stream.
When stdin closes (the bot went away) the running job stops at its next step and the worker exits.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from trainer.contract import protocol
from trainer.contract.protocol import JobKind
from trainer.contract.errors import Cancelled, SetupError, UserError
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE, NO_SAFETY_CHECKER, check_deep_cache
from trainer.training.live import LiveTrainings

OUT_OF_MEMORY = ("The GPU ran out of memory while running your job. Try fewer or smaller images, or try again when "
                 "the server is less busy.")
INTERNAL_ERROR = ("Something went wrong on the GPU while running your job. The server admins can find the details "
                  "in the bot's log.")
SAFETY_CHECKER_FAILED = ("The safety filter is on for this server, but the bot could not load its base model's safety "
                         "checker ({why}), so images can't be checked and none were made. An admin can turn the filter "
                         "off with `/queue admin safety state:off`; the bot's log says more.")
NO_MODEL = "The GPU worker was started without a base model (--no-model), so it can only run self-tests."
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress events a second per job (plus the first and the last step)
SELFTEST_MAX_S = 3600.0
IDLE_POLL_S = 2.0  # how long the job loop waits for a request before doing idle work
STACK_STAMP = "stack-check.json"  # under the cache directory: the package versions whose probe passed


def _deep_cache(raw: str) -> int:
    try:
        return check_deep_cache(int(raw))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: hub id, local diffusers directory or .safetensors/.ckpt file")
    parser.add_argument("--models", default="",
                        help="further base models a job may name: name=ref,name=ref (loaded when first needed)")
    parser.add_argument("--resident", type=int, default=1,
                        help="how many base models may stay loaded at once, free GPU memory permitting (default 1)")
    parser.add_argument("--no-model", action="store_true",
                        help="do not load a base model: only `selftest` jobs run (GPU checks, benchmarks, tests)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="default auto")
    parser.add_argument("--data-dir", required=True, help="the bot's data directory (caches live under it)")
    parser.add_argument("--compile-unet", action="store_true",
                        help="compile the UNet with torch.compile inside the CUDA graphs (CUDA only): faster images, "
                             "about a minute of compiling per image size the first time (kept under "
                             "DATA_DIR/cache/inductor for the next start)")
    parser.add_argument("--compile-ahead", choices=("auto", "on", "off"), default="auto",
                        help="compile the UNet forward for the image shapes members use in a separate process and use "
                             "it once ready, so nobody waits for a compile (cached under DATA_DIR/cache/aot; auto: on "
                             "CUDA GPUs with 22 GB or more in all, 40 GB for SDXL, unless base models may be evicted; "
                             "the default)")
    parser.add_argument("--deep-cache", type=_deep_cache, default=DEFAULT_DEEP_CACHE, metavar="N",
                        help=f"/imagine reuses the UNet's deep features between sampler steps: a whole forward on "
                             f"every N-th step, a twelfth of it on the others (1: off; default {DEFAULT_DEEP_CACHE})")
    parser.add_argument("--train-memory", choices=("auto", "low", "fast"), default="auto",
                        help="training's memory setting: low (gradient checkpointing: SDXL training + serving fit a "
                             "24 GB card), fast, or auto (low for SDXL on GPUs under 40 GB; default)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="use at most this much of the GPU's memory, as if the card had no more (a GPU shared "
                             "with other programs; default: all of it)")
    parser.add_argument("--warm-up", choices=("auto", "on", "off"), default="auto",
                        help="one throwaway /imagine before reporting ready, so the first member's does not pay for "
                             "the CUDA graph capture (auto: on CUDA devices)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice). Leaving one core free keeps the bot "
                             "responsive on CPU-only machines")


class EventWriter:
    """Writes protocol events, one line each, to the stream the bot reads. Safe to call from any thread."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self.gpu: str | None = None  # a CUDA device: `ready` and end events carry its memory (with_gpu_memory)

    def send(self, message: dict) -> None:
        if self.gpu is not None and message.get("event") in MEMORY_EVENTS:
            message = with_gpu_memory(message, self.gpu)
        data = protocol.encode(message)
        with self._lock:
            self._stream.write(data)
            self._stream.flush()


class JobControl:
    """What the stdin reader thread tells the job loop: jobs to run, cancels, and whether the bot has gone away.

    A cancel applies to a job that is running or waiting here, alone or inside a `run_many`; one for any other job
    is stale and ignored (job ids repeat: a training runs as several `run`s of the same id).
    """

    def __init__(self):
        self.jobs: queue.Queue[dict | None] = queue.Queue()
        self._active: dict[int, int] = {}  # job id -> runs received and not yet ended
        self._cancelled: set[int] = set()
        self._yields: set[int] = set()
        self._lock = threading.Lock()
        self.closing = threading.Event()
        self.loading = True  # until the model is resident: nothing to finish or save, so closing exits at once

    def submit(self, message: dict) -> None:
        self.register(message)
        self.jobs.put(message)

    def register(self, message: dict) -> None:
        """Count a request's jobs as running here, so that a cancel for them applies (`submit` does it for requests
        from stdin; the Ray actor, trainer/remote/actor.py, runs its requests itself)."""
        with self._lock:
            for job_id in protocol.job_ids(message):
                self._active[job_id] = self._active.get(job_id, 0) + 1

    def ended(self, job_id: int) -> None:
        with self._lock:
            left = self._active.get(job_id, 1) - 1
            if left > 0:
                self._active[job_id] = left
            else:
                self._active.pop(job_id, None)
                self._cancelled.discard(job_id)
            self._yields.discard(job_id)  # a yield is for the run it arrived during

    def cancel(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._active:
                self._cancelled.add(job_id)

    def request_yield(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._active:
                self._yields.add(job_id)

    def should_yield(self, job_id: int) -> Callable[[], bool]:
        return lambda: job_id in self._yields

    def work_waiting(self) -> bool:
        """A request is queued behind the one running (what stops a prefill)."""
        return not self.jobs.empty()

    def is_cancelled(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def should_stop(self, job_id: int) -> Callable[[], bool]:
        return lambda: self.closing.is_set() or self.is_cancelled(job_id)

    def close(self) -> None:
        self.closing.set()
        self.jobs.put(None)
        if self.loading:
            os._exit(0)  # the main thread is inside a model load that cannot be interrupted


def read_requests(stream, control: JobControl) -> None:
    """The stdin reader thread: runs until EOF or `shutdown`."""
    for raw in stream:
        if not raw.strip():
            continue
        try:
            message = protocol.decode(raw)
        except protocol.ProtocolError as e:
            print(f"worker: ignoring a bad request: {e}", file=sys.stderr, flush=True)
            continue
        op = message.get("op")
        if op in ("run", "run_many", "prefill"):
            control.submit(message)
        elif op == "cancel":
            control.cancel(message["job_id"])
        elif op == "yield":
            control.request_yield(message["job_id"])
        elif op == "shutdown":
            break
        else:
            print(f"worker: ignoring an event sent to the worker: {message}", file=sys.stderr, flush=True)
    control.close()


class ProgressReporter:
    """Turns engine progress callbacks into throttled `progress` events."""

    def __init__(self, writer: EventWriter, job_id: int):
        self._writer = writer
        self._job_id = job_id
        self._last = 0.0
        self._stage = None

    def __call__(self, info) -> None:
        step, total = int(_field(info, "step", 0)), int(_field(info, "total", 0))
        stage = _field(info, "stage")
        now = time.monotonic()
        if step not in (1, total) and stage == self._stage and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last, self._stage = now, stage
        eta, loss, preview = _field(info, "eta_s"), _field(info, "loss"), _field(info, "preview")
        self._writer.send(protocol.progress(
            self._job_id, step, total,
            eta_s=None if eta is None else round(float(eta), 2),
            loss=None if loss is None else float(loss),
            preview=None if preview is None else str(preview),
            stage=_field(info, "stage"), detail=_field(info, "detail"),
        ))


class BatchProgress:
    """Progress of a shared denoising loop, sent to every job in it. A preview shows one request's image, so it goes
    only to the job it belongs to: another member's picture (made with their private LoRA) is not shown to others."""

    def __init__(self, writer: EventWriter, own_previews: dict[int, Path]):
        self._reporters = {job_id: ProgressReporter(writer, job_id) for job_id in own_previews}
        self._own_previews = own_previews

    def __call__(self, info) -> None:
        preview = _field(info, "preview")
        without_preview = None
        for job_id, reporter in self._reporters.items():
            if preview is None or Path(preview) == self._own_previews[job_id]:
                reporter(info)
            else:
                if without_preview is None:
                    without_preview = {name: _field(info, name)
                                       for name in ("step", "total", "eta_s", "loss", "stage", "detail")}
                reporter(without_preview)


def _field(info, name, default=None):
    if isinstance(info, dict):
        return info.get(name, default)
    return getattr(info, name, default)


class Worker:
    """The resident model and the engines. `run_job` turns one `run` request into exactly one end event, through its
    kind's handler (HANDLERS below); `run_many` sends exactly one end event for every job of a `run_many` request."""

    def __init__(self, writer: EventWriter, control: JobControl, *, pipe, device: str, model: str | None,
                 data_dir: Path, compile_unet: bool = False, train_memory: str = "auto", models=None,
                 default_model: str | None = None, compile_ahead: str = "auto", deep_cache: int = DEFAULT_DEEP_CACHE):
        self.writer = writer
        self.models = models  # trainer.models.resident.ResidentModels: the base models jobs may name
        self.default_model = default_model  # the name a job without "model" in its params uses
        self.resident = None  # the Resident whose pipeline `pipe` is
        self.control = control
        self.pipe = pipe
        self.device = device
        self.model = model
        self.data_dir = data_dir
        self.compile_unet = compile_unet
        self.compile_ahead = compile_ahead  # trainer/generation/aot_kernels.py `compiles_ahead`
        self.deep_cache = deep_cache  # trainer/generation/deep_cache.py: a whole UNet forward every n-th step
        self.train_memory = train_memory
        self.generation = None  # the resident GenerationService, made at the first /imagine
        self.live = LiveTrainings()  # a training that yielded, kept resident until it resumes
        self.safety_problem: str | None = None  # why the safety filter cannot run, once a job found out

    def serve(self) -> None:
        try:
            self._serve()
        finally:
            self.live.drop()  # its checkpoint write (a background thread) lands before the process ends
            for generation in self._generations():
                generation.stop_compiling()

    def _serve(self) -> None:
        while True:
            try:
                message = self.control.jobs.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                self.idle()
                continue
            if message is None or self.control.closing.is_set():
                return  # shutdown, or the bot went away: jobs still queued here have nobody to report to
            try:
                if message["op"] == "prefill":
                    self.prefill(message)
                elif message["op"] == "run_many":
                    self.run_many(message["jobs"])
                else:
                    self.run_job(message["job_id"], message["kind"], message["params"])
            finally:
                for job_id in protocol.job_ids(message):
                    self.control.ended(job_id)

    def idle(self) -> None:
        """No request for IDLE_POLL_S: the resident generation adopts what was compiled ahead of time meanwhile."""
        if self.generation is None or self.live.held is not None:
            return  # a held training's graph points at the UNet as it is: no new captures beside it
        try:
            self.generation.idle()
        except Exception as exc:  # noqa: BLE001 - only speed is at stake: log it and go on
            print(f"worker: idle work failed:\n{''.join(traceback.format_exception(exc))}", file=sys.stderr, flush=True)

    def _generations(self) -> list:
        if self.models is None:
            return [self.generation] if self.generation is not None else []
        return self.models.generations()

    def run_job(self, job_id: int, kind: str, params: dict) -> None:
        self.writer.send(self._run_one(job_id, kind, params))

    def _run_one(self, job_id: int, kind: str, params: dict) -> dict:
        """Run one job; returns its end event."""
        if self.control.is_cancelled(job_id):
            return protocol.cancelled(job_id)
        handler = HANDLERS.get(kind)
        if handler is None:
            return protocol.failed(job_id, f"Unknown job kind {kind!r}.")
        try:
            on_progress = ProgressReporter(self.writer, job_id)
            event = handler(self, job_id, params, on_progress, self.control.should_stop(job_id))
        except Cancelled:
            event = protocol.cancelled(job_id)
        except BaseException as exc:  # noqa: BLE001 - every failure must become a `failed` event, then we go on
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            event = self._failed([job_id], kind, exc)[0]
        return event

    def _failed(self, job_ids: list[int], kind: str, exc: BaseException) -> list[dict]:
        """`failed` events for jobs that one exception ended (logged once, memory released after an OOM)."""
        error, detail = describe_failure(exc, kind)
        if detail:
            which = ", ".join(str(j) for j in job_ids)
            print(f"worker: job {which} ({kind}) failed:\n{detail}", file=sys.stderr, flush=True)
        if is_out_of_memory(exc):
            release_memory()
        return [protocol.failed(job_id, error, detail) for job_id in job_ids]

    def run_many(self, jobs: list[dict]) -> None:
        """Serve several /imagine jobs with one `imagine_many` call; send exactly one end event per job.

        The batch stops early only when every job in it is cancelled; a job cancelled while it ran gets `cancelled`
        and its images are deleted. A member's mistake (UserError) in one request fails the whole engine call, so
        then each request runs alone and only the faulty one fails. Any other failure (OOM, a crash) fails them all.
        """
        ended: set[int] = set()

        def end(event: dict) -> None:
            self.writer.send(event)
            ended.add(event["job_id"])

        if len({job["params"].get("model") or self.default_model for job in jobs}) > 1:
            for job in jobs:  # the bot batches only jobs of one base model; should others come, each runs alone
                end(self._run_one(job["job_id"], job["kind"], job["params"]))
            return
        requests, params = {}, {}
        for job in jobs:
            job_id = job["job_id"]
            if self.control.is_cancelled(job_id):
                end(protocol.cancelled(job_id))
                continue
            try:
                requests[job_id] = self.imagine_request(job["params"])
                params[job_id] = job["params"]
            except BaseException as exc:  # noqa: BLE001 - a bad request fails its own job only
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                end(self._failed([job_id], JobKind.IMAGINE, exc)[0])
        try:
            if requests:
                self._imagine_batch(requests, params, end)
        finally:
            for job in jobs:  # a safety net: never leave the bot waiting for a job that has no end event
                if job["job_id"] not in ended:
                    end(protocol.failed(job["job_id"], INTERNAL_ERROR, "run_many ended without an event for it"))

    def _imagine_batch(self, requests: dict, params: dict, end: Callable[[dict], None]) -> None:
        ids = list(requests)
        print(f"worker: run_many: {len(ids)} imagine job(s) in one batch: {', '.join(map(str, ids))}",
              file=sys.stderr, flush=True)
        own_previews = {job_id: Path(r.preview_path or r.out_dir / "preview.webp") for job_id, r in requests.items()}

        def should_stop() -> bool:
            return self.control.closing.is_set() or all(self.control.is_cancelled(job_id) for job_id in ids)

        try:
            results = self.generation.imagine_many([requests[job_id] for job_id in ids],
                                                    on_progress=BatchProgress(self.writer, own_previews),
                                                    should_stop=should_stop)
        except Cancelled:
            for job_id in ids:
                end(protocol.cancelled(job_id))
        except UserError:
            # The service checks every request before the GPU starts and names only the first problem: run each
            # request alone so that only the member who made the mistake gets it.
            for job_id in ids:
                end(self._run_one(job_id, JobKind.IMAGINE, params[job_id]))
        except BaseException as exc:  # noqa: BLE001 - every failure must become `failed` events, then we go on
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            for event in self._failed(ids, JobKind.IMAGINE, exc):
                end(event)
        else:
            for job_id, result in zip(ids, results):
                if self.control.is_cancelled(job_id):
                    _delete_outputs(result.to_dict())
                    end(protocol.cancelled(job_id))
                else:
                    end(protocol.done(job_id, result.to_dict()))

    def use_model(self, params: dict) -> None:
        """Make the base model the job's params name (default: the worker's default model) the one `pipe` holds,
        loading it (and evicting others) when it is not resident. Nothing to do for a worker without models."""
        if self.models is None:
            return
        name = params.get("model") or self.default_model
        if self.resident is not None and self.resident.name == name and self.resident.pipe is not None:
            self.resident.last_used = time.monotonic()
            return
        self.live.drop()  # a held training lives in the old pipeline
        # Drop our references first: an eviction inside get() must be able to free the old pipeline's memory.
        self.pipe, self.generation, self.resident, self.safety_problem = None, None, None, None
        try:
            self.resident = self.models.get(name)
        except SetupError as error:
            raise UserError(f"The base model {name} could not be loaded, so this job could not run; an admin can "
                            f"see why in `/queue admin models` ({error})") from error
        self.pipe, self.model, self.generation = self.resident.pipe, self.resident.ref, self.resident.generation

    def imagine_request(self, params: dict):
        """The checked /imagine request; creates the resident GenerationService on first use."""
        from trainer.generation.service import GenerationService, ImagineRequest

        self.use_model(params)
        if self.pipe is None:
            raise UserError(NO_MODEL)
        if self.generation is None:
            self.live.drop()  # the service changes the UNet's weight layout, which a held training graph points at
            from trainer.generation.aot_kernels import AOT_CACHE, compiles_ahead

            may_evict = self.models is not None and len(self.models.catalog) > self.models.keep
            aot_dir = (self.data_dir / AOT_CACHE
                       if compiles_ahead(self.compile_ahead, self.pipe, may_evict=may_evict) else None)
            self.generation = GenerationService(self.pipe, model_name=self.model or "", compile_unet=self.compile_unet,
                                                aot_dir=aot_dir, training_held=lambda: self.live.held is not None,
                                                deep_cache_every=self.deep_cache)
            if self.resident is not None:
                self.resident.generation = self.generation
        request = ImagineRequest.from_params(params)
        if request.safety:
            self.require_safety_checker()
        return request

    def warm_up(self) -> float:
        """One throwaway /imagine at the model's defaults before the worker says it is ready, so the first member's
        /imagine finds the generation service made, its CUDA graph captured and the kernels chosen (those compiled
        ahead of time by an earlier run are adopted here if torch's loader is prepared already, else at the first
        idle moment after: the start does not wait for it). Seconds taken."""
        import tempfile

        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="boothbot-warm-up-") as out:
            request = self.imagine_request({"prompt": "a photo", "out_dir": out})  # makes self.generation
            self.generation.idle()
            self.generation.imagine(request)
        return time.monotonic() - started

    def prefill(self, message: dict) -> None:
        """Make class images while nothing else waits; any request arriving stops it at the next sampler step (the
        batch it stopped in goes on at the next prefill). First, remove the sets no training used for UNUSED_DAYS."""
        from trainer.training.prefill import prefill_class_images
        from trainer.training.priors import UNUSED_DAYS, prune_unused

        if self.pipe is None:
            return
        self.live.drop()  # the GPU is idle: nobody resumes it soon, and the memory is better spent here
        for directory in prune_unused(self.data_dir / "cache"):
            print(f"worker: removed the class images in {directory.name}: unused for {UNUSED_DAYS} days",
                  file=sys.stderr, flush=True)
        try:
            complete = prefill_class_images(
                self.pipe, message["classes"], cache_dir=self.data_dir / "cache", count=message.get("count"),
                resolution=message.get("resolution"),
                should_stop=lambda: self.control.closing.is_set() or self.control.work_waiting(),
                unfinished=self.live.class_batches,
                on_image=lambda name, done, count: self.writer.send(
                    protocol.prefill_state("progress", class_name=name, done=done, count=count)))
        except Exception as exc:  # noqa: BLE001 - nobody's job: log it, the next idle moment tries again
            print(f"worker: prefill failed:\n{''.join(traceback.format_exception(exc))}", file=sys.stderr, flush=True)
            if is_out_of_memory(exc):
                release_memory()
            self.writer.send(protocol.prefill_state("stopped"))
            return
        self.writer.send(protocol.prefill_state("complete" if complete else "stopped"))

    def require_safety_checker(self) -> None:
        """Load the model's safety checker the first time a job asks for it; UserError when there is none (tried
        once: a model without one will not grow one, and a failed download is not retried for every job)."""
        from trainer.generation import safety

        if safety.has_checker(self.pipe):
            return
        if self.safety_problem is None:
            source = safety.checker_source(self.model)
            if source is None:
                self.safety_problem = NO_SAFETY_CHECKER
            else:
                try:
                    safety.load_checker(self.pipe, source)
                    print(f"worker: loaded the safety checker of {source}", file=sys.stderr, flush=True)
                    return
                except Exception as exc:  # noqa: BLE001 - told to the member; the detail goes to the log
                    print(f"worker: could not load the safety checker of {source}:\n"
                          f"{''.join(traceback.format_exception(exc))}", file=sys.stderr, flush=True)
                    why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    self.safety_problem = SAFETY_CHECKER_FAILED.format(why=why)
        raise UserError(self.safety_problem)


# --- the job kinds the worker runs: each turns one `run` into its end event ---------------------------------------
# A handler gets (worker, job_id, params, on_progress, should_stop); it raises Cancelled when should_stop() turned
# True, UserError for a member's mistake, anything else for a failure. The engines are imported inside the handlers,
# so a worker started for self-tests never imports them.

def run_train(worker: Worker, job_id: int, params: dict, on_progress, should_stop) -> dict:
    from trainer.training.engine import BATCH_RECIPE_FIELDS, TrainSpec, recipe_at_batch, train_concept

    worker.use_model(params)
    if worker.pipe is None:
        raise UserError(NO_MODEL)
    from trainer.training.memory import default_batch_for, gradient_checkpointing_for, keeps_generation_memory

    checkpointing = gradient_checkpointing_for(worker.train_memory, worker.pipe)
    spec = TrainSpec.from_params({"gradient_checkpointing": checkpointing, "sample_deep_cache": worker.deep_cache,
                                  **params})
    if all(params.get(name) is None for name in BATCH_RECIPE_FIELDS):
        spec = recipe_at_batch(spec, default_batch_for(worker.train_memory, worker.pipe))
    resuming_live = worker.live.held is not None and worker.live.held.spec.out_dir == spec.out_dir
    adapters_added = []
    keep_generation = keeps_generation_memory(worker.pipe)

    def before_adapters() -> None:
        # The CUDA graphs' pools: lets the training fit a 12 GB card. Not before the class images, which run beside
        # them as a prefill does: a training that yields while making them keeps /imagine's graphs. A big GPU keeps
        # them throughout (trainer/training/memory.py).
        adapters_added.append(True)
        if keep_generation:
            return
        if worker.models is not None:
            worker.models.release_generation_memory()  # every resident model's graph pools
        elif worker.generation is not None:
            worker.generation.release_memory()

    cache_dir = Path(params.get("cache_dir") or worker.data_dir / "cache")
    outcome = None
    try:
        outcome = train_concept(worker.pipe, spec, cache_dir=cache_dir, on_progress=on_progress,
                                should_stop=should_stop, slice_s=params.get("slice_s"),
                                should_yield=worker.control.should_yield(job_id),
                                checkpoint_s=params.get("checkpoint_s"), live=worker.live,
                                before_adapters=before_adapters)
    finally:
        trained = adapters_added or resuming_live
        if (worker.generation is not None and worker.live.held is None and (trained or outcome is None)
                and not keep_generation):
            # Ending the training moved the UNet's weights back to generation's layout: graphs captured while it
            # was suspended point at the old ones. (Kept graphs see the move themselves: fast_unet._check_params.)
            worker.generation.release_memory()
    if outcome.run is not None:
        print(f"worker: job {job_id}: {describe_run(outcome)}", file=sys.stderr, flush=True)
    if outcome.status == "done":
        if worker.resident is not None:  # the concept records the base model it was trained on
            return protocol.done(job_id, {**outcome.result, "model": worker.resident.name,
                                          "family": worker.resident.family})
        return protocol.done(job_id, outcome.result)
    if outcome.status == "paused":
        return protocol.paused(job_id, outcome.step, outcome.total)
    if outcome.status == "cancelled":
        return protocol.cancelled(job_id)
    raise RuntimeError(f"train_concept returned an unknown status {outcome.status!r}")


def describe_run(outcome) -> str:
    """One line per training run for the log: where it went on from and what its setup and its steps cost."""
    run = outcome.run
    where = "started" if run["from"] == "start" else f"resumed from {run['from']}"
    return (f"{where} at step {run['first_step']}; setup {run['setup_s']:.2f} s, steps {run['steps']} in "
            f"{run['steps_s']:.2f} s; {outcome.status} {_where_it_stopped(outcome)}")


def _where_it_stopped(outcome) -> str:
    """"in class images 16/50", "after the class images", "after the inputs", "at step 1/800" or "at step 800/800, in
    the samples, ..."."""
    phase = outcome.run.get("phase", "steps")
    if phase == "class_images":
        return f"in class images {outcome.run.get('phase_detail', '')}".rstrip()
    if phase == "inputs":
        return "after the class images"
    if phase == "adapters":
        return "after the inputs"
    detail = outcome.run.get("phase_detail")  # in the steps phase: only a pause in the samples has one
    return f"at step {outcome.step}/{outcome.total}" + (f", {detail}" if detail else "")


def run_imagine(worker: Worker, job_id: int, params: dict, on_progress, should_stop) -> dict:
    request = worker.imagine_request(params)
    result = worker.generation.imagine(request, on_progress=on_progress, should_stop=should_stop)
    return protocol.done(job_id, result.to_dict())


def run_selftest(worker: Worker, job_id: int, params: dict, on_progress, should_stop) -> dict:
    return protocol.done(job_id, selftest(params, worker.device, on_progress, should_stop))


HANDLERS: dict[str, Callable[..., dict]] = {
    JobKind.TRAIN: run_train,
    JobKind.IMAGINE: run_imagine,
    JobKind.SELFTEST: run_selftest,
}


def _delete_outputs(result: dict) -> None:
    """Remove the files of an /imagine result nobody will receive (its job was cancelled while the batch ran)."""
    paths = [*result.get("images", []), result.get("grid"), *(result.get("small") or {}).values()]
    for path in paths:
        if path:
            with contextlib.suppress(OSError):
                Path(path).unlink()


def selftest(params: dict, device: str, on_progress, should_stop) -> dict:
    """A real torch workload: square matmuls for `seconds`, in steps of `step_s`, cancellable between steps.

    Used by `python -m bot check --gpu`, the event-loop lag benchmark and the worker tests. A long `step_s` stands
    for a step that cannot be interrupted (cancel waits for its end).
    """
    import torch

    seconds = _number(params, "seconds", 3.0, 0.0, SELFTEST_MAX_S)
    step_s = _number(params, "step_s", 0.1, 0.001, SELFTEST_MAX_S)
    # 8192 on a GPU: each product is long enough (~1 ms on an H100) that launches and syncs do not dominate.
    size = int(_number(params, "size", 8192 if device.startswith("cuda") else 256, 16, 16384))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    total = max(1, math.ceil(seconds / step_s))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    matmuls, started = 0, time.perf_counter()
    for step in range(1, total + 1):
        if should_stop():
            raise Cancelled()
        step_end = started + step * step_s
        while True:
            torch.matmul(a, b)
            sync()
            matmuls += 1
            if time.perf_counter() >= step_end:
                break
        elapsed = time.perf_counter() - started
        on_progress({"step": step, "total": total, "eta_s": max(0.0, seconds - elapsed), "loss": None})
    elapsed = time.perf_counter() - started
    return {"steps": total, "seconds": round(elapsed, 3), "matmuls": matmuls, "size": size, "device": device,
            "tflops": round(2 * size ** 3 * matmuls / max(elapsed, 1e-9) / 1e12, 3)}


def _number(params: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = params.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserError(f"selftest {name}={value!r} is not allowed; allowed: {lo}..{hi}")
    return float(value)


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the worker
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_failure(exc: BaseException, kind: str) -> tuple[str, str]:
    """(message a member understands, traceback for the log). A UserError's text is shown as it is."""
    if isinstance(exc, UserError):
        return str(exc), ""
    detail = "".join(traceback.format_exception(exc))
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY, detail
    return INTERNAL_ERROR, detail


def describe_start_failure(exc: Exception, args: argparse.Namespace) -> str:
    """The `fatal` event's error: a SetupError says what to do by itself; anything else is a bug, whose traceback
    the bot logs at debug level."""
    if isinstance(exc, SetupError):
        return str(exc)
    what = "the GPU worker could not start" if args.no_model else f"the base model {args.model} could not be loaded"
    return f"{what}: {exc!r} (run with --debug or BOOTHBOT_LOG_LEVEL=debug to see the traceback)"


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def claim_stdout():
    """Keep the real stdout for events; point fd 1 and sys.stdout at stderr so stray prints cannot corrupt it."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "wb", buffering=0)


def log_engine_lines(debug: bool) -> None:
    """The engine's own log lines (loggers under `trainer`: each /imagine's time, CUDA graph captures, a training's
    summary, warnings) on stderr, which the bot logs as the worker's lines. Library loggers are left as they are."""
    level = os.environ.get("BOOTHBOT_LOG_LEVEL", "info").strip().upper()
    engine = logging.getLogger("trainer")
    engine.setLevel(logging.DEBUG if debug else getattr(logging, level, logging.INFO))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    engine.addHandler(handler)
    engine.propagate = False


def _warms_up(setting: str, device: str) -> bool:
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index
        return f"{device} ({torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())})"
    return device


MEMORY_EVENTS = {"ready", *protocol.JOB_END_EVENTS}


def with_gpu_memory(event: dict, device: str) -> dict:
    """`event` with a `gpu_memory` field: the CUDA device's memory now, in bytes (`reserved` by this process, its
    `peak` so far, the card's `total`, or the limit set for the worker), which the bot's metrics show per lane."""
    import torch

    from trainer.training.memory import total_gib

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return {**event, "gpu_memory": {"reserved": torch.cuda.memory_reserved(index),
                                    "peak": torch.cuda.max_memory_reserved(index),
                                    "total": int(total_gib(index) * 2**30)}}


def exit_fatal(writer: EventWriter, error: str, detail: str, code: int) -> NoReturn:
    """Tell the bot why the worker cannot start, then exit at once: a normal interpreter shutdown would abort on the
    stdin reader thread, which is blocked in a read holding the stream's lock."""
    writer.send(protocol.fatal(error, detail))
    sys.stderr.flush()
    os._exit(code)


def resident_models(args: argparse.Namespace, device: str, writer: EventWriter):
    """The worker's base models: --models plus --model (the default, named as in --models when listed there, else
    by its reference). Each model's family is detected from its files now. Returns (ResidentModels, the default's
    name)."""
    from trainer.models.resident import ResidentModels, parse_catalog

    catalog = parse_catalog(args.models)
    default = next((name for name, ref in catalog.items() if ref == args.model), None)
    if default is None:
        default = args.model
        catalog = {default: args.model, **catalog}
    models = ResidentModels(catalog, device=device, dtype=args.dtype, keep=args.resident)
    models.survey()
    return models, default


def run(args: argparse.Namespace) -> int:
    events = claim_stdout()
    log_engine_lines(args.debug)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a download's bars would be lines in the bot's log
    writer = EventWriter(events)
    control = JobControl()
    if not args.no_model and not args.model:
        writer.send(protocol.fatal("the worker needs --model (or --no-model for self-tests only)"))
        return 2
    threading.Thread(target=read_requests, args=(sys.stdin.buffer, control), name="worker-stdin", daemon=True).start()
    try:
        import torch

        from trainer.models.loading import pick_device, pick_dtype

        if args.threads:
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        dtype = pick_dtype(device, args.dtype)
        writer.gpu = device if device.startswith("cuda") else None
        if args.gpu_memory_gib and device.startswith("cuda"):
            from trainer.training.memory import limit_gpu_memory

            limit_gpu_memory(torch.device(device), args.gpu_memory_gib)
        pipe = None
        if not args.no_model:
            from trainer.compat import check_stack
            from trainer.models.loading import require_model
            from trainer.quiet import quiet_libraries

            require_model(args.model)  # a wrong path fails here at once, before seconds of importing diffusers
            if args.compile_unet:
                from trainer.generation.fast_unet import keep_compiled_kernels

                keep_compiled_kernels(Path(args.data_dir))
            quiet_libraries(args.debug)  # bars and notices would be lines in the bot's log
            # Before the base model (maybe a download of gigabytes): can this set of packages train a LoRA at all?
            stack = check_stack(stamp=Path(args.data_dir) / "cache" / STACK_STAMP)
            if not stack.ok:
                exit_fatal(writer, f"the installed packages cannot train LoRAs: {stack.problem}", stack.detail, 4)
            models, default_model = resident_models(args, device, writer)
            pipe = models.get(default_model).pipe
    except Exception as exc:  # noqa: BLE001 - whatever stops the start is reported to the bot, then we exit
        exit_fatal(writer, describe_start_failure(exc, args), "".join(traceback.format_exception(exc)), 3)
    control.loading = False
    model_facts = {}
    if not args.no_model:
        model_facts["models"] = models.facts()
    if pipe is not None:
        from trainer.generation.safety import checker_source
        from trainer.generation.service import native_side
        from trainer.models.family import family_of

        model_facts |= {"native_side": native_side(pipe), "safety_checker": checker_source(args.model) is not None,
                       "family": family_of(pipe).name}
    worker = Worker(writer, control, pipe=pipe, device=device, model=None if args.no_model else args.model,
                    data_dir=Path(args.data_dir), compile_unet=args.compile_unet, train_memory=args.train_memory,
                    compile_ahead=args.compile_ahead, deep_cache=args.deep_cache,
                    models=None if args.no_model else models, default_model=None if args.no_model else default_model)
    if worker.models is not None:
        worker.resident = worker.models.get(default_model)
    pipe = None  # the resident models hold it now: an eviction must be able to free its memory
    if worker.pipe is not None and _warms_up(args.warm_up, device):
        try:
            print(f"worker: warmed up for /imagine in {worker.warm_up():.1f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only means the first /imagine pays for it
            print(f"worker: the /imagine warm-up failed ({exc}); the first /imagine does it", file=sys.stderr, flush=True)
    writer.send(protocol.ready(describe_device(device), str(dtype).removeprefix("torch."),
                               None if args.no_model else args.model, os.getpid(), **model_facts))
    if worker.models is not None:
        # From now on every load and eviction is sent to the bot (`ready` above carried the state so far).
        worker.models.on_change = lambda: writer.send(protocol.models(worker.models.facts()))
    try:
        worker.serve()
    except BrokenPipeError:
        pass  # the bot went away while we were writing: nobody is left to tell
    return 0
