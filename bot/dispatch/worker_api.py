"""The GPU worker as the dispatcher's lanes see it: exactly what a lane uses of a worker, whatever runs it.

`WorkerClient` (bot/dispatch/worker_client.py: a `python -m trainer worker` subprocess on this host) implements it;
a worker on another machine (a Ray actor) implements the same surface. Job requests and events are the plain dicts of
trainer/contract/protocol.py: a `run` / `run_many` returns the jobs' end events and never raises for a job's failure;
a worker that dies fails the running jobs with `worker_client.CRASHED` and comes back by itself.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

ProgressCallback = Callable[[dict], Awaitable[None]]


@runtime_checkable
class GpuWorker(Protocol):
    label: str  # which worker this is, for logs and /queue admin workers: "cpu", "cuda:1", "ray:10.0.0.7/gpu0"
    ready_info: dict | None  # the last `ready` event (device, dtype, model, native_side, safety_checker)
    last_fatal: dict | None  # the last `fatal` event: why the worker could not start
    starts: int  # how many times it was started (restarts included)

    @property
    def is_ready(self) -> bool: ...

    async def start(self) -> None:
        """Start the worker (and keep it alive) in the background; returns at once."""

    async def wait_ready(self, timeout: float | None = None) -> dict:
        """The `ready` event, once the worker can take a job (raises TimeoutError after `timeout`)."""

    async def wait_first_start(self) -> dict | None:
        """The first `ready` event, or None when the first start ended without one (see `last_fatal`)."""

    async def run(self, job_id: int, kind: str, params: dict, *, on_progress: ProgressCallback | None = None,
                  timeout_s: float | None = None) -> dict:
        """Run one job (or one training slice) and return its end event: done, paused, cancelled or failed."""

    async def run_many(self, jobs: Sequence[dict], *, on_progress: ProgressCallback | None = None,
                       timeout_s: float | None = None) -> dict[int, dict]:
        """Run several /imagine jobs as one batch: {job_id: end event}."""

    async def cancel(self, job_id: int) -> None:
        """Ask the worker to stop `job_id` at its next step boundary (no-op when it is not running it)."""

    async def request_yield(self, job_id: int) -> None:
        """Ask the worker to pause the training `job_id` at its next step boundary (its run ends with `paused`)."""

    async def prefill(self, classes: list[str]) -> None:
        """The GPU is idle: make class images for these classes until the next request (nothing is awaited)."""

    async def kill(self) -> None:
        """Kill the worker now; the running jobs fail with CRASHED and the worker is started again."""

    async def stop(self) -> None:
        """Shut the worker down for good (the bot is stopping)."""
