"""RayWorkerClient: a GpuWorker (bot/dispatch/worker_api.py) whose engine is a Ray actor (trainer/remote/actor.py),
on this machine or another one, sharing no files with the bot.

A request goes out with its input files by content hash (bot/dispatch/ray_files.py); only files the actor does not
hold yet travel, through Ray's object store (`ray.put`). The client then long-polls the actor for events: progress
(with a new preview's bytes), the end events, and at the end every file the run made, written under the bot's data
directory before the end events are handed on, so a `done` names files that are here.

An actor that dies (its process, or its node) fails only its own request: a training gets `CRASHED`, which the runner
turns into a requeue from the last checkpoint that came back (any lane may take it); an /imagine (or a batch of them)
is sent once more, to the same actor once Ray has restarted it (`max_restarts`), and fails with `CRASHED` if that
dies too. Meanwhile this lane is not ready and the other lanes keep serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from bot import metrics
from bot.dispatch.ray_files import (FileHashes, input_files, megabytes, relative_to_root, write_preview,
                                    write_returned)
from bot.dispatch.worker_api import ProgressCallback
from bot.dispatch.worker_client import CRASHED, SHUTTING_DOWN, TIMED_OUT
from trainer.contract import protocol
from trainer.contract.durations import format_duration
from trainer.contract.protocol import JobKind

log = logging.getLogger("boothbot.worker")

POLL_S = 1.0  # how long one `events` call waits on the actor for something to happen
CALL_TIMEOUT_S = 30.0  # a cancel sent to an actor that may be restarting
RETRY_READY_WAIT_S = 300.0  # how long a retried /imagine waits for its restarted actor
HANDOVER_FAILED = ("The bot could not hand your job to its GPU worker (an internal error). Please try again; if it "
                   "keeps happening, tell a server admin.")


class RayWorkerClient:
    def __init__(self, actor, *, data_dir: Path | str, index: int = 0, cancel_grace_s: float = 15.0):
        self.actor = actor
        self.root = Path(data_dir).resolve()
        self.index = index
        self.label = f"ray:{index}"  # until the actor says where it runs
        self.cancel_grace_s = cancel_grace_s
        self.ready_info: dict | None = None
        self.last_fatal: dict | None = None
        self.starts = 0  # how many times the actor came up (Ray's restarts included)
        self.bytes_sent = 0  # input files sent to the actor, in all
        self.bytes_received = 0  # result files and previews received, in all
        self.requests = 0  # requests the actor took (a training slice is one)
        self._ready = asyncio.Event()
        self._first_start_over = asyncio.Event()
        self._job_lock = asyncio.Lock()
        self._hashes = FileHashes()
        self._actor_has: set[str] = set()  # content hashes this actor incarnation holds (sent or made by it)
        self._moved: dict[int, list[int]] = {}  # job id -> [sent, received] over its requests (a training's slices)
        self._coming_up: asyncio.Task | None = None
        self._stopping = False

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        self._stopping = False
        self._come_up()

    async def wait_ready(self, timeout: float | None = None) -> dict:
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.ready_info is not None
        return self.ready_info

    async def wait_first_start(self) -> dict | None:
        await self._first_start_over.wait()
        return self.ready_info if self.is_ready else None

    async def run(self, job_id: int, kind: str, params: dict, *, on_progress: ProgressCallback | None = None,
                  timeout_s: float | None = None) -> dict:
        ends = await self._exchange(protocol.run(job_id, kind, params), on_progress, timeout_s)
        return ends[job_id]

    async def run_many(self, jobs: Sequence[dict], *, on_progress: ProgressCallback | None = None,
                       timeout_s: float | None = None) -> dict[int, dict]:
        return await self._exchange(protocol.run_many(list(jobs)), on_progress, timeout_s)

    async def cancel(self, job_id: int) -> None:
        with contextlib.suppress(Exception):  # an actor that is gone has nothing to cancel
            await asyncio.wait_for(_result(self.actor.cancel.remote(job_id)), CALL_TIMEOUT_S)

    async def request_yield(self, job_id: int) -> None:
        with contextlib.suppress(Exception):  # an actor that is gone runs no training to pause
            await asyncio.wait_for(_result(self.actor.request_yield.remote(job_id)), CALL_TIMEOUT_S)

    async def prefill(self, classes: list[str]) -> None:
        """Not on Ray yet: each request runs in its own mirror of the data directory on the actor and a training's
        inputs (ray_files.py) do not include class images, so a set made while idle would not be there for it."""

    async def kill(self) -> None:
        """Kill the actor; Ray starts it again (`max_restarts`) and the running request fails with CRASHED."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=False)

    async def stop(self) -> None:
        """End the actor for good (the bot is stopping); a request still running fails with SHUTTING_DOWN, so the
        runner leaves its job for the next start to recover."""
        import ray

        self._stopping = True
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        if self._coming_up is not None:
            self._coming_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._coming_up
        self._ready.clear()

    # --- the actor coming up -----------------------------------------------------------------------------------------

    def _come_up(self) -> None:
        if self._coming_up is None or self._coming_up.done():
            self._coming_up = asyncio.create_task(self._wait_for_actor(), name=f"ray-worker-{self.index}")

    async def _wait_for_actor(self) -> None:
        """Ask the actor for its `ready` event; Ray holds the call while it starts or restarts."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            while not self._stopping:
                try:
                    info = await _result(self.actor.ready.remote())
                except ActorUnavailableError:
                    await asyncio.sleep(POLL_S)
                    continue
                except RayActorError as e:
                    self.last_fatal = protocol.fatal(f"the Ray worker actor is gone for good: {_first_line(e)}",
                                                     str(e))
                    log.error("%s: the Ray worker actor is gone for good: %s", self.label, e)
                    return
                self.starts += 1
                self._actor_has.clear()  # a new process: its cache may be empty
                if info.get("event") == "fatal":
                    self.last_fatal = info
                    log.error("the Ray worker %s cannot start: %s", self.label, info["error"])
                    return
                self.ready_info, self.last_fatal = info, None
                gpus = info.get("gpus") or []
                self.label = f"ray:{info.get('host', '?')}/" + (f"gpu{','.join(gpus)}" if gpus else f"cpu{self.index}")
                log.info("Ray worker ready: %s, device %s, dtype %s, model %s, pid %s", self.label, info["device"],
                         info["dtype"], info["model"], info["pid"])
                metrics.worker_event(self.label, info)
                self._ready.set()
                return
        finally:
            self._first_start_over.set()

    def _lost_actor(self, why: str) -> None:
        self._ready.clear()
        metrics.worker_exited(self.label, restarting=not self._stopping)
        if not self._stopping:
            log.warning("the Ray worker %s died (%s); Ray restarts it, the other workers go on", self.label, why)
            self._come_up()

    # --- requests ----------------------------------------------------------------------------------------------------

    async def _exchange(self, message: dict, on_progress: ProgressCallback | None,
                        timeout_s: float | None) -> dict[int, dict]:
        job_ids = protocol.job_ids(message)
        retries = 1 if all(job["kind"] == JobKind.IMAGINE for job in message.get("jobs") or [message]) else 0
        async with self._job_lock:
            await self._ready.wait()
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            while True:
                ends, death = await self._request(message, job_ids, on_progress, deadline, timeout_s)
                if death is None:
                    self._log_moved(message, ends)
                    return ends
                if self._stopping:
                    return {job_id: protocol.failed(job_id, SHUTTING_DOWN, death) for job_id in job_ids}
                self._lost_actor(death)
                if retries and await self._back_in_time(deadline):
                    retries -= 1
                    log.warning("job %s: the Ray worker died under it; running it once more", _ids(job_ids))
                    continue
                return {job_id: protocol.failed(job_id, CRASHED, f"the Ray worker died: {death}")
                        for job_id in job_ids}

    async def _back_in_time(self, deadline: float | None) -> bool:
        """Wait for the restarted actor, up to the job's deadline; False when it did not come back."""
        loop = asyncio.get_running_loop()
        wait = RETRY_READY_WAIT_S if deadline is None else min(RETRY_READY_WAIT_S, deadline - loop.time())
        try:
            await asyncio.wait_for(self._ready.wait(), max(0.0, wait))
            return True
        except TimeoutError:
            return False

    async def _request(self, message: dict, job_ids: list[int], on_progress: ProgressCallback | None,
                       deadline: float | None, timeout_s: float | None) -> tuple[dict[int, dict], str | None]:
        """One request on the actor: (end events, None), or (whatever ended, why the actor died)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        request_id = uuid.uuid4().hex
        try:
            sent = await self._start_request(request_id, message)
        except RayActorError as e:
            return {}, _first_line(e)
        except Exception:  # noqa: BLE001 - a file the actor refused, a bug: the jobs fail, the lane goes on
            log.exception("job %s: could not start it on the Ray worker %s", _ids(job_ids), self.label)
            return {job_id: protocol.failed(job_id, HANDOVER_FAILED) for job_id in job_ids}, None
        self.requests += 1
        self._count(job_ids, sent=sent)
        loop = asyncio.get_running_loop()
        ends: dict[int, dict] = {}
        overdue: list[int] = []
        grace_end = None
        killed = False
        while True:
            now = loop.time()
            if deadline is not None and grace_end is None and now >= deadline:
                overdue = [job_id for job_id in job_ids if job_id not in ends]
                log.warning("job %s passed its time limit of %.0f s; cancelling it", _ids(overdue), timeout_s)
                for job_id in overdue:
                    await self.cancel(job_id)
                grace_end = now + self.cancel_grace_s
            if grace_end is not None and not killed and now >= grace_end:
                log.error("job %s did not stop within %.0f s of its cancel; killing the Ray worker %s",
                          _ids(overdue), self.cancel_grace_s, self.label)
                killed = True
                await self.kill()
            try:
                answer = await _result(self.actor.events.remote(request_id, POLL_S))
            except ActorUnavailableError:
                await asyncio.sleep(POLL_S)  # restarting, or the network: a restarted actor says it lost the request
                continue
            except RayActorError as e:
                death = _first_line(e)
                break
            if not answer["known"]:
                death = "the actor restarted and no longer knows the request"
                break
            for event in answer["events"]:
                await self._handle(event, job_ids, ends, on_progress)
            if answer["over"]:
                received = await asyncio.to_thread(write_returned, self.root, answer["files"], answer["deleted"],
                                                   self._hashes)
                self._actor_has.update(file["sha"] for file in answer["files"].values())
                self._count(job_ids, received=received)
                death = None
                break
        if overdue:
            if killed:
                self._lost_actor("killed after a job's time limit")
            detail = f"stopped after its time limit of {timeout_s:.0f} s" + (" (worker killed)" if killed else "")
            limit = format_duration(timeout_s)
            ends.update({job_id: protocol.failed(job_id, TIMED_OUT.format(limit=limit), detail) for job_id in overdue})
            return ends, None
        if death is not None:
            return ends, death
        for job_id in job_ids:
            ends.setdefault(job_id, protocol.failed(job_id, HANDOVER_FAILED, "the Ray worker sent no end event"))
        return ends, None

    async def _handle(self, event: dict, job_ids: list[int], ends: dict[int, dict],
                      on_progress: ProgressCallback | None) -> None:
        kind = event.get("event")
        if event.get("job_id") not in job_ids:
            return
        if kind in protocol.JOB_END_EVENTS:
            metrics.worker_event(self.label, event)
            ends.setdefault(event["job_id"], event)
        elif kind == "progress":
            preview_file = event.pop("preview_file", None)
            if preview_file is not None:
                received = await asyncio.to_thread(write_preview, self.root, preview_file)
                self._count([event["job_id"]], received=received)
            if on_progress is not None:
                try:
                    await on_progress(event)
                except Exception:  # a broken progress display must not stop the job
                    log.exception("progress callback failed for job %s", event["job_id"])

    async def _start_request(self, request_id: str, message: dict) -> int:
        """Send the request with the input files the actor lacks; returns the bytes sent."""
        inputs, paths = await asyncio.to_thread(self._inputs, message)
        to_send = [sha for sha in paths if sha not in self._actor_has]
        sent = 0
        for _ in range(2):
            blobs, size = await asyncio.to_thread(self._put, {sha: paths[sha] for sha in to_send})
            sent += size
            missing = await _result(self.actor.start.remote({"id": request_id, "message": message,
                                                             "bot_root": str(self.root), "inputs": inputs,
                                                             "blobs": blobs}))
            if not missing:
                self._actor_has.update(paths)
                return sent
            to_send = [sha for sha in missing if sha in paths]  # it restarted (or evicted them) since we last sent
        raise RuntimeError(f"the Ray worker still lacks {len(missing)} input file(s) after they were sent")

    def _inputs(self, message: dict) -> tuple[dict[str, str], dict[str, Path]]:
        """({path relative to the data directory: sha256}, {sha256: file}) of the request's input files."""
        inputs, paths = {}, {}
        for path in input_files(message):
            try:
                rel = relative_to_root(path, self.root)
            except ValueError:
                log.warning("%s is outside the data directory %s, so no Ray worker can get it", path, self.root)
                continue
            sha = self._hashes.sha(path)
            inputs[rel], paths[sha] = sha, path
        return inputs, paths

    @staticmethod
    def _put(files: dict[str, Path]) -> tuple[dict, int]:
        import ray

        blobs, size = {}, 0
        for sha, path in files.items():
            data = path.read_bytes()
            blobs[sha] = ray.put(data)
            size += len(data)
        return blobs, size

    def _count(self, job_ids: list[int], *, sent: int = 0, received: int = 0) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        share = len(job_ids)
        for job_id in job_ids:
            moved = self._moved.setdefault(job_id, [0, 0])
            moved[0] += sent // share
            moved[1] += received // share

    def _log_moved(self, message: dict, ends: dict[int, dict]) -> None:
        kinds = {job["job_id"]: job["kind"] for job in message.get("jobs") or [message]}
        for job_id, end in ends.items():
            if end["event"] == "paused":
                continue  # a training's next slice adds to it
            sent, received = self._moved.pop(job_id, (0, 0))
            log.info("job %s (%s) on %s moved %s to the worker and %s back", job_id, kinds.get(job_id), self.label,
                     megabytes(sent), megabytes(received))


async def _result(ref):
    """An actor call's result, awaited without blocking the event loop (a driver's ObjectRef or a Ray Client one)."""
    return await asyncio.wrap_future(ref.future())


def _ids(job_ids: list[int]) -> str:
    return ", ".join(map(str, job_ids))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
