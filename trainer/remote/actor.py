"""The GPU worker as a Ray actor: the same engine as `python -m trainer worker` (trainer/worker.py's Worker and its
HANDLERS), reached through Ray instead of stdin/stdout, on a machine that shares no files with the bot.

The bot's side is bot/dispatch/ray_client.py. A request is a protocol `run` / `run_many` message plus its input files
by content hash (`inputs`: {path relative to the bot's data directory: sha256}); bytes travel only for hashes this
actor has not cached (`blobs`: {sha256: ObjectRef}). `start` places the files in a fresh work directory
(trainer/remote/workdir.py), rewrites the paths and runs the request on a thread of its own; the bot long-polls
`events`, which hands back the protocol events (paths rewritten to the bot's) and, once the request is over, every
file it made or changed, as bytes. A progress event with a new preview carries the preview's bytes.

The class is plain Python: the bot wraps it with `ray.remote` (threaded: `cancel` and `events` run while a job does).
torch is imported only in the actor's process, when the model loads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import traceback
import uuid
from pathlib import Path

from trainer.contract import protocol
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE
from trainer.remote.blobs import DEFAULT_LIMIT_BYTES, BlobStore, sha256_of
from trainer.remote.workdir import WorkDir, safe_relative
from trainer.worker import STACK_STAMP, JobControl, Worker, describe_device, describe_start_failure


ACTORS_DIR = Path(tempfile.gettempdir()) / "boothbot-ray"  # on each node: one directory per actor process


class Request:
    """One request's events on their way to the bot: filled by the job thread, emptied by `events` calls."""

    def __init__(self, request_id: str, workdir: WorkDir):
        self.id = request_id
        self.workdir = workdir
        self.events: list[dict] = []
        self.files: dict[str, dict] = {}  # relative path -> {"sha", "data"}: what the run made or changed
        self.deleted: list[str] = []
        self.over = False
        self.previews_sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) already sent
        self.condition = threading.Condition()

    def add(self, event: dict) -> None:
        with self.condition:
            self.events.append(event)
            self.condition.notify_all()

    def finish(self, files: dict[str, dict], deleted: list[str]) -> None:
        with self.condition:
            self.files, self.deleted, self.over = files, deleted, True
            self.condition.notify_all()

    def take(self, wait_s: float) -> dict:
        with self.condition:
            self.condition.wait_for(lambda: self.events or self.over, wait_s)
            events, self.events = self.events, []
            answer = {"known": True, "events": events, "over": self.over}  # `finish` comes after the last event
            if answer["over"]:
                answer.update(files=self.files, deleted=self.deleted)
            return answer


class WorkerActor:
    def __init__(self, *, model: str | None, device: str = "auto", dtype: str = "auto", compile_unet: bool = False,
                 threads: int | None = None, cache_limit_bytes: int = DEFAULT_LIMIT_BYTES,
                 deep_cache: int = DEFAULT_DEEP_CACHE):
        self.root = _fresh_root()
        self.blobs = BlobStore(self.root / "blobs", cache_limit_bytes)
        self.cache_dir = self.root / "cache"  # class images: kept for every training on this actor
        self.control = JobControl()
        self.control.loading = False  # requests arrive through Ray: nothing here must exit the process
        self._requests: dict[str, Request] = {}
        self._current: Request | None = None
        self._engine = threading.Lock()  # one request on the model at a time, as in the subprocess worker
        self._lock = threading.Lock()
        self.ready_event = self._load(model, device, dtype, threads)
        self.worker = Worker(self, self.control, pipe=self._pipe, device=self._device, model=model,
                             data_dir=self.root, compile_unet=compile_unet, deep_cache=deep_cache)

    def _load(self, model, device, dtype, threads) -> dict:
        """The `ready` event, or a `fatal` one saying why the model could not load (the actor stays up to say so)."""
        self._pipe, self._device = None, device
        try:
            import torch

            from trainer.compat import check_stack
            from trainer.models.loading import load_pipeline, pick_device, pick_dtype, require_model
            from trainer.quiet import quiet_libraries

            if threads:
                torch.set_num_threads(threads)
            self._device = pick_device(device)
            torch_dtype = pick_dtype(self._device, dtype)
            facts = {}
            if model is not None:
                require_model(model)
                quiet_libraries(False)
                stack = check_stack(stamp=ACTORS_DIR / STACK_STAMP)  # probed once per node and package set
                if not stack.ok:
                    return protocol.fatal(f"the installed packages cannot train LoRAs: {stack.problem}", stack.detail)
                self._pipe = load_pipeline(model, self._device, dtype)
                from trainer.generation.safety import checker_source
                from trainer.generation.service import native_side

                facts = {"native_side": native_side(self._pipe), "safety_checker": checker_source(model) is not None}
            return protocol.ready(describe_device(self._device), str(torch_dtype).removeprefix("torch."), model,
                                  os.getpid(), **facts)
        except Exception as exc:  # noqa: BLE001 - told to the bot, which logs it and keeps this lane down
            why = describe_start_failure(exc, _StartArgs(model))
            return protocol.fatal(why, "".join(traceback.format_exception(exc)))

    # --- called by the bot through Ray ----------------------------------------------------------------------------

    def ready(self) -> dict:
        """The `ready` (or `fatal`) event, plus where this actor runs: its node and GPUs."""
        import ray

        context = ray.get_runtime_context()
        return {**self.ready_event, "node": context.get_node_id()[:8], "host": _host(),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def start(self, request: dict) -> list[str]:
        """Start a request; returns [] when it runs, else the hashes of input files this actor lacks (nothing ran:
        send them in `blobs` and start it again)."""
        import ray

        blobs = request.get("blobs") or {}
        if blobs:
            shas = list(blobs)
            for sha, data in zip(shas, ray.get([blobs[sha] for sha in shas])):
                self.blobs.put(sha, data)
        inputs = request.get("inputs") or {}
        missing = self.blobs.missing(inputs.values())
        if missing:
            return missing
        message = request["message"]
        protocol.job_ids(message)  # a malformed message fails here, in the caller, not on the job thread
        workdir = WorkDir(self.root / "work" / uuid.uuid4().hex, request["bot_root"])
        workdir.materialise(inputs, self.blobs)
        message = workdir.to_actor(message)
        for job in message.get("jobs") or [message]:
            job["params"]["cache_dir"] = str(self.cache_dir)
        entry = Request(request["id"], workdir)
        with self._lock:
            self._requests[entry.id] = entry
        self.control.register(message)
        threading.Thread(target=self._serve, args=(entry, message), name=f"request-{entry.id[:8]}",
                         daemon=True).start()
        return []

    def events(self, request_id: str, wait_s: float = 1.0) -> dict:
        """The request's events since the last call (waits up to `wait_s` for one). `over`: the last answer, which
        carries the files; `known` False: this actor never ran it (it restarted since)."""
        with self._lock:
            entry = self._requests.get(request_id)
        if entry is None:
            return {"known": False, "events": [], "over": True}
        answer = entry.take(wait_s)
        if answer["over"]:
            with self._lock:
                self._requests.pop(request_id, None)
        return answer

    def cancel(self, job_id: int) -> None:
        self.control.cancel(job_id)

    def request_yield(self, job_id: int) -> None:
        self.control.request_yield(job_id)

    def cached(self) -> int:
        """How many files this actor holds in its cache (tests, logs)."""
        return sum(1 for _ in self.blobs.root.iterdir())

    # --- the job thread --------------------------------------------------------------------------------------------

    def send(self, event: dict) -> None:
        """The Worker's event writer: the running request's events, with the bot's paths (and new previews' bytes)."""
        entry = self._current
        if entry is None:
            return
        event = entry.workdir.to_bot(self._with_preview(entry, event))
        entry.add(event)

    def _with_preview(self, entry: Request, event: dict) -> dict:
        preview = event.get("preview")
        rel = entry.workdir.relative(preview) if preview else None
        if rel is None:
            return event
        path = entry.workdir.root / rel
        try:
            stat = path.stat()
            if entry.previews_sent.get(rel) == (stat.st_size, stat.st_mtime_ns):
                return event
            data = path.read_bytes()
        except OSError:
            return {**event, "preview": None}
        entry.previews_sent[rel] = (stat.st_size, stat.st_mtime_ns)
        return {**event, "preview_file": {"path": rel, "data": data}}

    def _serve(self, entry: Request, message: dict) -> None:
        files, deleted = {}, []
        try:
            with self._engine:
                self._current = entry
                try:
                    if message["op"] == "run_many":
                        self.worker.run_many(message["jobs"])
                    else:
                        self.worker.run_job(message["job_id"], message["kind"], message["params"])
                finally:
                    self._current = None
                    for job_id in protocol.job_ids(message):
                        self.control.ended(job_id)
            files, deleted = self._results(entry)
        except BaseException as exc:  # noqa: BLE001 - the bot must hear of it; jobs without an end event fail there
            print(f"ray worker: request {entry.id} broke:\n{''.join(traceback.format_exception(exc))}", flush=True)
        finally:
            entry.finish(files, deleted)
            entry.workdir.remove()

    def _results(self, entry: Request) -> tuple[dict[str, dict], list[str]]:
        changed, deleted = entry.workdir.changes()
        files = {}
        for rel, path in changed.items():
            stat = path.stat()
            if entry.previews_sent.get(rel) == (stat.st_size, stat.st_mtime_ns):
                continue  # already went with a progress event
            data = path.read_bytes()
            sha = sha256_of(data)
            self.blobs.adopt(sha, path)  # a checkpoint sent back now need not come again for the next slice
            files[safe_relative(rel).as_posix()] = {"sha": sha, "data": data}
        return files, deleted


def _fresh_root() -> Path:
    """This actor's directory (work directories, cache), after removing those of actors on this node that are gone
    (killed or crashed: they could not clean up after themselves)."""
    ACTORS_DIR.mkdir(parents=True, exist_ok=True)
    for old in ACTORS_DIR.glob("actor-*"):
        pid = old.name.removeprefix("actor-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    root = ACTORS_DIR / f"actor-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _StartArgs:
    """What describe_start_failure reads of the worker's command line."""

    def __init__(self, model: str | None):
        self.model, self.no_model = model, model is None


def _host() -> str:
    import socket

    return socket.gethostname()
