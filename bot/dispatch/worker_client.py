"""WorkerClient: spawns `python -m trainer worker`, talks the JSON-lines protocol, and restarts the worker when it dies.

Everything here is asyncio streams, so the event loop never waits on the GPU. One request runs at a time: `run`
returns its job's end event (done, paused, cancelled or failed); `run_many` sends several /imagine jobs as one batch
and returns every job's end event. A worker that dies mid-job (segfault, CUDA OOM kill, SIGKILL)
turns into a `failed` event with a message a member understands, and a fresh worker is started with backoff.
A job past its time limit is asked to cancel and, if it does not stop within a grace period, the worker is killed.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.dispatch.worker_api import ProgressCallback
from trainer.contract import protocol
from trainer.contract.durations import format_duration
from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE
from bot import metrics

log = logging.getLogger("boothbot.worker")

CRASHED = "The GPU worker crashed while running your job; it has been restarted. Please try again."
TIMED_OUT = "Your job ran longer than the limit of {limit} and was stopped."
SHUTTING_DOWN = "The bot is shutting down; your job was stopped."
RESTART_DELAYS_S = (0.5, 2.0, 5.0, 15.0, 30.0, 60.0)
HEALTHY_AFTER_S = 60.0  # a worker that lived this long resets the restart backoff
STREAM_LIMIT = 16 * 1024 * 1024  # longest line we accept (tracebacks in `detail` can be long)


def worker_command(*, model: str | None, data_dir: Path | str, device: str = "auto", dtype: str = "auto",
                   threads: int | None = None, compile_unet: bool = False, debug: bool = False,
                   train_memory: str = "auto", models: dict[str, str] | None = None, resident: int = 1,
                   compile_ahead: str = "auto", gpu_memory_gib: float | None = None,
                   deep_cache: int = DEFAULT_DEEP_CACHE, python: str = sys.executable) -> list[str]:
    """The argv that starts the worker; `model=None` starts one without a base model (selftest jobs only).
    `models`: every base model jobs may name (name -> reference, the default included), `resident`: how many may
    stay loaded. `debug`: the libraries' own warnings and progress bars reach the log too (trainer/quiet.py)."""
    argv = [python, "-m", "trainer", "worker", "--data-dir", str(Path(data_dir).resolve()),
            "--device", device, "--dtype", dtype]
    argv += ["--no-model"] if model is None else ["--model", model]
    if model is not None and models:
        argv += ["--models", ",".join(f"{name}={ref}" for name, ref in models.items()), "--resident", str(resident)]
    if threads:
        argv += ["--threads", str(threads)]
    if compile_unet:
        argv += ["--compile-unet"]
    if train_memory != "auto":
        argv += ["--train-memory", train_memory]
    if compile_ahead != "auto":
        argv += ["--compile-ahead", compile_ahead]
    if gpu_memory_gib:
        argv += ["--gpu-memory-gib", f"{gpu_memory_gib:g}"]
    if deep_cache != DEFAULT_DEEP_CACHE:
        argv += ["--deep-cache", str(deep_cache)]
    if debug:
        argv += ["--debug"]
    return argv


def _device_of(argv: Sequence[str]) -> str:
    """The `--device` of a worker command line ("auto" when it has none)."""
    argv = list(argv)
    return argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "auto"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "the worker closed its output"
    if returncode < 0:
        try:
            return f"the worker was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"the worker was killed by signal {-returncode}"
    return f"the worker exited with code {returncode}"


class WorkerClient:
    """A `GpuWorker` (bot/dispatch/worker_api.py) that is a subprocess on this host."""

    def __init__(self, argv: Sequence[str], *, cwd: Path | str | None = None,
                 restart_delays_s: Sequence[float] = RESTART_DELAYS_S, cancel_grace_s: float = 15.0,
                 stop_grace_s: float = 15.0, label: str | None = None):
        self.argv = list(argv)
        self.label = label or _device_of(self.argv)
        self.cwd = cwd
        self.restart_delays_s = tuple(restart_delays_s)
        self.cancel_grace_s = cancel_grace_s
        self.stop_grace_s = stop_grace_s
        self.ready_info: dict | None = None  # the last `ready` event
        self.models_info: list[dict] | None = None  # the worker's base models: `ready`'s, then each `models` event
        self.last_fatal: dict | None = None  # the last `fatal` event (the worker could not start)
        self.last_prefill: dict | None = None  # the last `prefill` event (class images made while idle)
        self.starts = 0  # how many worker processes were launched
        self.exits = 0  # how many of them have exited
        self._first_start_over = asyncio.Event()  # the first worker is ready, or ended without ever being ready
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._job_lock = asyncio.Lock()
        self._inbox: tuple[frozenset[int], asyncio.Queue] | None = None  # the running request's job ids
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=30)

    @classmethod
    def from_settings(cls, settings, *, device: str | None = None, **kwargs) -> "WorkerClient":
        """The worker the settings describe, on `device` (default: BOOTHBOT_DEVICE)."""
        return cls(worker_command(model=settings.model, data_dir=settings.data_dir, device=device or settings.device,
                                  dtype=settings.dtype, compile_unet=settings.compile_unet,
                                  models=settings.base_models, resident=settings.resident_models,
                                  train_memory=settings.train_memory, compile_ahead=settings.compile_ahead,
                                  gpu_memory_gib=settings.gpu_memory_gib, deep_cache=settings.deep_cache,
                                  debug=settings.log_level == "DEBUG"), **kwargs)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        """Launch the worker and keep it alive in the background; `wait_ready` waits for the model to load."""
        if self._supervisor is None:
            self._stopping = False
            self._stop_requested.clear()
            self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def wait_ready(self, timeout: float | None = None) -> dict:
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.ready_info is not None
        return self.ready_info

    async def wait_first_start(self) -> dict | None:
        """The first worker's `ready` event, or None when it ended without loading the model (see `last_fatal`)."""
        await self._first_start_over.wait()
        return self.ready_info

    async def run(self, job_id: int, kind: str, params: dict, *, on_progress: ProgressCallback | None = None,
                  timeout_s: float | None = None) -> dict:
        """Run one job (or one slice of a training) and return its end event. Never raises for job failures."""
        ends = await self._exchange(protocol.run(job_id, kind, params), on_progress, timeout_s)
        return ends[job_id]

    async def run_many(self, jobs: Sequence[dict], *, on_progress: ProgressCallback | None = None,
                       timeout_s: float | None = None) -> dict[int, dict]:
        """Run several /imagine jobs (`[{"job_id", "kind", "params"}, ...]`) as one batch; returns {job_id: end event}.

        `on_progress` gets every job's progress events (each names its job_id). `timeout_s` is for the whole batch:
        past it, every unfinished job is cancelled and fails with the time-limit message. A worker that dies fails
        every job of the batch that has not ended. Never raises for job failures.
        """
        return await self._exchange(protocol.run_many(list(jobs)), on_progress, timeout_s)

    async def _exchange(self, message: dict, on_progress: ProgressCallback | None,
                        timeout_s: float | None) -> dict[int, dict]:
        """Send a `run` or `run_many` and collect one end event per job (progress goes to `on_progress`)."""
        job_ids = protocol.job_ids(message)
        async with self._job_lock:
            await self._ready.wait()
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            inbox: asyncio.Queue = asyncio.Queue()
            self._inbox = (frozenset(job_ids), inbox)
            ends: dict[int, dict] = {}
            try:
                await self._send(message)
                while len(ends) < len(job_ids):
                    remaining = None if deadline is None else max(0.0, deadline - loop.time())
                    try:
                        event = await asyncio.wait_for(inbox.get(), remaining)
                    except TimeoutError:
                        pending = [job_id for job_id in job_ids if job_id not in ends]
                        ends.update(await self._stop_overdue(pending, inbox, timeout_s))
                        break
                    if event["event"] in protocol.JOB_END_EVENTS:
                        ends.setdefault(event["job_id"], event)  # after a crash report, a late event changes nothing
                    elif event["event"] == "progress" and on_progress is not None:
                        try:
                            await on_progress(event)
                        except Exception:  # a broken progress display must not stop the job
                            log.exception("progress callback failed for job %s", event["job_id"])
                return ends
            finally:
                self._inbox = None

    async def cancel(self, job_id: int) -> None:
        """Ask the worker to stop `job_id` at its next step boundary (no-op when it is not running)."""
        await self._send(protocol.cancel(job_id))

    async def request_yield(self, job_id: int) -> None:
        """Ask the worker to pause the training `job_id` at its next step boundary: someone waits for the GPU. Its
        `run` then ends with `paused` (no-op when it is not running)."""
        await self._send(protocol.yield_training(job_id))

    async def prefill(self, classes: list[str]) -> None:
        """The GPU is idle: let the worker make class images for these classes until the next request (no answer
        is awaited; its `prefill` events are logged)."""
        if self._ready.is_set():
            await self._send(protocol.prefill(classes))

    async def kill(self) -> None:
        """SIGKILL the worker now; the supervisor fails the running job and starts a new worker."""
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def stop(self) -> None:
        """Ask the worker to shut down, kill it after the grace period, and stop restarting it."""
        self._stopping = True
        self._stop_requested.set()
        proc = self._proc
        if proc and proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._send(protocol.shutdown())
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace_s)
            except TimeoutError:
                log.warning("the GPU worker did not stop within %.0f s; killing it", self.stop_grace_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._supervisor), self.stop_grace_s)
            except TimeoutError:
                self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    # --- internals ---
    async def _send(self, message: dict) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return  # the supervisor reports the death to the running job
        try:
            proc.stdin.write(protocol.encode(message))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # same: the worker died; the supervisor notices the EOF

    async def _stop_overdue(self, job_ids: list[int], inbox: asyncio.Queue, timeout_s: float) -> dict[int, dict]:
        """Cancel jobs past their time limit, kill the worker if they do not stop in time; each fails as timed out."""
        which = ", ".join(map(str, job_ids))
        log.warning("job %s passed its time limit of %.0f s; cancelling it", which, timeout_s)
        for job_id in job_ids:
            await self.cancel(job_id)
        loop = asyncio.get_running_loop()
        grace_end = loop.time() + self.cancel_grace_s
        killed = False
        ends: dict[int, dict] = {}
        while len(ends) < len(job_ids):
            remaining = grace_end - loop.time()
            try:
                event = await asyncio.wait_for(inbox.get(), None if killed else max(0.0, remaining))
            except TimeoutError:
                log.error("job %s did not stop within %.0f s of its cancel; killing the GPU worker",
                          which, self.cancel_grace_s)
                killed = True
                await self.kill()
                continue
            if event["event"] in protocol.JOB_END_EVENTS and event["job_id"] in job_ids:
                detail = f"stopped after its time limit of {timeout_s:.0f} s" + (" (worker killed)" if killed else "")
                ends.setdefault(event["job_id"], protocol.failed(
                    event["job_id"], TIMED_OUT.format(limit=format_duration(timeout_s)), detail))
        return ends

    async def _supervise(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            try:
                returncode = await self._run_one_worker()
            except OSError as e:
                log.error("could not start the GPU worker (%s): %s", " ".join(self.argv[:4]), e)
                returncode = None
            self.exits += 1
            metrics.worker_exited(self.label, restarting=not self._stopping)
            self._first_start_over.set()
            if self._stopping:
                break
            lived = loop.time() - started
            failures = 0 if lived >= HEALTHY_AFTER_S else failures + 1
            delay = self.restart_delays_s[min(max(failures - 1, 0), len(self.restart_delays_s) - 1)]
            log.warning("%s after %.1f s; restarting it in %.1f s", describe_exit(returncode), lived, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _run_one_worker(self) -> int | None:
        self._ready.clear()
        self._stderr_tail.clear()
        self.starts += 1
        proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=self.cwd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=STREAM_LIMIT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the bot, which shuts the worker down itself
        )
        self._proc = proc
        log.info("GPU worker started (pid %s)", proc.pid)
        stderr_task = asyncio.create_task(self._drain_stderr(proc), name="worker-stderr")
        try:
            await self._read_events(proc)
            self._ready.clear()  # at once: no new job may be sent to a worker whose output has ended
            returncode = await proc.wait()
            with contextlib.suppress(asyncio.CancelledError):
                await stderr_task
        finally:
            self._ready.clear()
            stderr_task.cancel()
            if proc.returncode is None:  # the supervisor itself was cancelled: never leave an orphan behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self._fail_running_job(returncode)
        return returncode

    async def _read_events(self, proc: asyncio.subprocess.Process) -> None:
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over STREAM_LIMIT: the stream is out of step, start over
                log.error("the GPU worker wrote a line over %d bytes; restarting it", STREAM_LIMIT)
                proc.kill()
                return
            if not line:
                return
            try:
                event = protocol.decode(line)
            except protocol.ProtocolError as e:
                log.warning("ignoring a bad line from the GPU worker: %s", e)
                continue
            self._route(event)

    def _route(self, event: dict) -> None:
        metrics.worker_event(self.label, event)
        kind = event.get("event")
        if kind == "models":
            self.models_info = event["models"]
        elif kind == "ready":
            self.ready_info = event
            self.models_info = event.get("models", self.models_info)
            self.last_fatal = None
            log.info("GPU worker ready: device %s, dtype %s, model %s, pid %s",
                     event["device"], event["dtype"], event["model"], event["pid"])
            self._ready.set()
            self._first_start_over.set()
        elif kind == "fatal":
            self.last_fatal = event
            log.error("the GPU worker cannot start: %s", event["error"])
            if event.get("detail"):
                log.debug("the GPU worker's traceback:\n%s", event["detail"])
        elif kind == "prefill":
            self.last_prefill = event
            if event["state"] != "progress":
                log.info("class-image prefill %s", event["state"])
        elif self._inbox is not None and event.get("job_id") in self._inbox[0]:
            self._inbox[1].put_nowait(event)
        else:
            log.debug("ignoring a late event for a job that is no longer running: %s", event)

    def _fail_running_job(self, returncode: int | None) -> None:
        """The worker died: every job of the running request that has not ended fails (ended ones keep their end)."""
        if self._inbox is None:
            return
        job_ids, inbox = self._inbox
        tail = "\n".join(self._stderr_tail)
        reason = SHUTTING_DOWN if self._stopping else CRASHED
        for job_id in sorted(job_ids):
            inbox.put_nowait(protocol.failed(job_id, reason, f"{describe_exit(returncode)}; last output:\n{tail}"))

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        # Must keep reading: a full stderr pipe would block the worker mid-job.
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:
                continue
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip()
            if text:
                self._stderr_tail.append(text)
                log.info("worker[%s]: %s", proc.pid, text)
