"""Ray workers (BOOTHBOT_WORKERS=ray://HOST:PORT or auto): connect to the cluster and start one GPU worker actor per
GPU in it (`num_gpus=1`), each a lane of the dispatcher through a RayWorkerClient (bot/dispatch/ray_client.py).

The actor is trainer/remote/actor.py's WorkerActor: the same engine as the local worker. The bot names it here only
to hand it to Ray, which runs it in a process of its own on a GPU node (where boothbot must be installed too);
torch is never imported in the bot. Ray restarts an actor that dies (`max_restarts`), on another node if its own is
gone. A cluster that cannot be reached is a SetupError that says what to do, unless BOOTHBOT_RAY_FALLBACK=local asks
for one local worker instead. BOOTHBOT_RAY_CPU_WORKERS=N starts N CPU actors instead of one per GPU (a cluster without
GPUs: the tests, or trying it out).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import socket

from bot.dispatch.ray_client import RayWorkerClient
from bot.dispatch.worker_api import GpuWorker
from bot.dispatch.worker_client import WorkerClient
from trainer.contract.errors import SetupError

log = logging.getLogger("boothbot.worker")

ACTOR_CLASS = ("trainer.remote.actor", "WorkerActor")
# Threaded: `events` and `cancel` calls run while a job does. A running request is never retried by Ray itself:
# the client decides (a training requeues from its checkpoint, an /imagine is sent once more).
ACTOR_OPTIONS = {"max_restarts": -1, "max_task_retries": 0, "max_concurrency": 4}
PROBE_TIMEOUT_S = 5.0
NOT_INSTALLED = ("BOOTHBOT_WORKERS={address} asks for Ray workers, but Ray is not installed: "
                 "pip install -c constraints.txt -e \".[ray]\" (or set BOOTHBOT_WORKERS=local)")
UNREACHABLE = ("Ray is unreachable at {address} ({why}). Start the cluster first (`ray start --head` on the head "
               "node, `ray start --address=HEAD:6379` on each GPU node; docs/SCALING.md), or set "
               "BOOTHBOT_WORKERS=local, or BOOTHBOT_RAY_FALLBACK=local to run on this machine while Ray is down.")
NO_GPUS = ("The Ray cluster at {address} has no GPUs. Start the GPU nodes with `ray start --address=HEAD:6379` "
           "(Ray finds their GPUs), or set BOOTHBOT_RAY_CPU_WORKERS=N for N (slow) CPU workers.")


async def start_ray_workers(settings) -> list[GpuWorker]:
    """One RayWorkerClient per actor (not started yet: `start()` each), or [a local WorkerClient] when Ray cannot
    be reached and BOOTHBOT_RAY_FALLBACK=local."""
    try:
        await asyncio.to_thread(connect, settings.workers)
    except SetupError as e:
        if settings.ray_fallback != "local":
            raise
        log.warning("%s; BOOTHBOT_RAY_FALLBACK=local: running one local worker on %s instead", e, settings.device)
        return [WorkerClient.from_settings(settings)]
    return create_workers(settings, address=settings.workers)


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("ray://HOST:PORT" or "auto"); SetupError when it cannot be reached.
    A process already connected (the tests' local cluster) stays on its cluster."""
    try:
        import ray
    except ImportError:
        raise SetupError(NOT_INSTALLED.format(address=address)) from None
    if address.startswith("ray://"):
        _probe(address)  # Ray's own client retries for half a minute before it says anything
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace="boothbot", logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise SetupError(UNREACHABLE.format(address=address, why=_first_line(e))) from None


def _probe(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise SetupError(UNREACHABLE.format(address=address, why=_first_line(e) or type(e).__name__)) from None


def create_workers(settings, *, address: str) -> list[RayWorkerClient]:
    """The actors on the cluster this process is connected to (`address`: for the log and messages)."""
    import ray

    if settings.ray_cpu_workers:
        count, resources, device, threads = settings.ray_cpu_workers, {"num_cpus": 1, "num_gpus": 0}, "cpu", 1
    else:
        count = int(ray.cluster_resources().get("GPU", 0))
        if count == 0:
            raise SetupError(NO_GPUS.format(address=address))
        resources, device, threads = {"num_gpus": 1}, "cuda", None
    module, name = ACTOR_CLASS
    actor_class = ray.remote(getattr(importlib.import_module(module), name)).options(**ACTOR_OPTIONS, **resources)
    clients = []
    for index in range(count):
        actor = actor_class.remote(model=settings.model, device=device, dtype=settings.dtype,
                                   compile_unet=settings.compile_unet, threads=threads,
                                   deep_cache=settings.deep_cache)
        clients.append(RayWorkerClient(actor, data_dir=settings.data_dir, index=index))
    log.info("starting %d Ray worker actor(s) on %s (%s each)", count, address,
             "1 GPU" if device == "cuda" else "1 CPU")
    return clients


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
