"""Which GPU workers the bot runs (BOOTHBOT_WORKERS), built as `GpuWorker`s (bot/dispatch/worker_api.py), one lane
each, and when the bot may serve: as soon as one of them is ready.

  local                    one `python -m trainer worker` subprocess on BOOTHBOT_DEVICE (the default)
  local:cuda:0,cuda:1,...  one subprocess per device listed (`local:cpu,cpu` gives two CPU workers: the tests' lanes)
  ray://HOST:PORT | auto   Ray actors across machines: bot/dispatch/ray_workers.py, with `pip install -e ".[ray]"`
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging

from bot.dispatch.worker_api import GpuWorker
from bot.dispatch.worker_client import WorkerClient
from bot.errors import SetupError

log = logging.getLogger("boothbot.worker")

RAY_MODULE = "bot.dispatch.ray_workers"
RAY_MISSING = ("BOOTHBOT_WORKERS={value} asks for Ray workers, which need `pip install -e \".[ray]\"` (and this "
               "version of the bot with Ray support); or set BOOTHBOT_WORKERS=local to use this machine's GPUs")


def uses_ray(settings) -> bool:
    return settings.workers == "auto" or settings.workers.startswith("ray://")


def local_devices(settings) -> list[str]:
    """The device of each local worker: BOOTHBOT_DEVICE for `local`, the listed ones for `local:...`."""
    if settings.workers == "local":
        return [settings.device]
    return settings.workers.removeprefix("local:").split(",")


async def build_workers(settings, *, retry_failed_start: bool = True) -> list[GpuWorker]:
    """The workers BOOTHBOT_WORKERS asks for, not started yet. SetupError when Ray is asked for but not installed.
    `retry_failed_start=False` (bot check): a local worker that dies is not started again for an hour."""
    if uses_ray(settings):
        if importlib.util.find_spec(RAY_MODULE) is None:
            raise SetupError(RAY_MISSING.format(value=settings.workers))
        workers = importlib.import_module(RAY_MODULE).start_ray_workers(settings)
        return list(await workers if inspect.isawaitable(workers) else workers)
    retry = {} if retry_failed_start else {"restart_delays_s": (3600.0,)}
    return [WorkerClient.from_settings(settings, device=device, **retry) for device in local_devices(settings)]


async def first_ready(workers: list[GpuWorker]) -> SetupError | None:
    """None as soon as one worker is ready (the bot can serve); a SetupError when every worker's first start ended
    without loading the model (nothing could ever run). A worker that failed while others came up is logged and
    keeps being retried in the background (`/queue admin workers` shows it as down)."""
    pending = {asyncio.ensure_future(worker.wait_first_start()): worker for worker in workers}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                worker = pending.pop(task)
                if task.result() is not None:
                    return None
                if len(workers) > 1:
                    log.error("lane %s: its GPU worker could not start%s; it keeps being retried", worker.label,
                              _reason(worker))
    finally:
        for task in pending:
            task.cancel()
    if len(workers) == 1 and workers[0].last_fatal is not None:
        return SetupError(workers[0].last_fatal["error"])
    if len(workers) == 1:
        return SetupError("the GPU worker exited before loading the base model; its last output is in the log above")
    return SetupError(f"none of the {len(workers)} GPU workers could load the base model: "
                      + "; ".join(f"{w.label}{_reason(w) or ': exited (see the log above)'}" for w in workers))


def _reason(worker: GpuWorker) -> str:
    return f": {worker.last_fatal['error']}" if worker.last_fatal else ""
