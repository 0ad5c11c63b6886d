"""`python -m bench.ray_latency`: the same /imagine jobs through the local GPU worker and through a Ray worker actor.

Each job goes the bot's whole dispatch path: submitted to a real SQLite ledger, claimed and run by the Runner on the
worker, its result files in the bot's data directory, recorded as succeeded. Latency is submit → recorded, one job
after another (the queue never holds two, so it is the path's own cost, not queueing). The local worker is today's
`python -m trainer worker` subprocess; the Ray worker is trainer/remote/actor.py on a Ray cluster this command starts
in-process (`ray.init`: one GPU with --device cuda, one CPU actor otherwise) and reaches through RayWorkerClient, with
every file moving as bytes. The two run one after the other on the same device. Prints one JSON object: p50/p99/mean
for each, the ratio of the Ray path to the local one, and the bytes the Ray path moved per /imagine (and, with
--train-steps, per /train of --photos photos).

  python -m bench.ray_latency --device cuda --model random-sd15 --jobs 30 --steps 30 --size 512 --train-steps 50
  python -m bench.ray_latency --quick          # the tiny model on the CPU: the CI-sized check that it all runs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.lag import prepare_model
from bot.dispatch.announcer import Announcer
from bot.dispatch.ray_workers import create_workers
from bot.dispatch.runner import Runner
from bot.dispatch.worker_client import WorkerClient, worker_command
from bot.jobs.kinds import KindContext
from bot.jobs.ledger import Ledger
from bot.services.concepts import ConceptService
from bot.services.gallery import Gallery
from bot.settings import Settings
from bot.store.database import Store

READY_TIMEOUT_S = 1800.0
OWNER, GUILD, CHANNEL = 1, 1, 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", default=None,
                        help="a diffusers directory or random-sd15 (the SD 1.5 architecture, random weights); "
                             "default: the tiny random model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--jobs", type=int, default=20, help="timed /imagine jobs per path (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed jobs first, per path (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per /imagine (default 30)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--count", type=int, default=1, help="images per /imagine (default 1)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also run one training of this many steps over Ray and report its bytes (default: no)")
    parser.add_argument("--photos", type=int, default=10, help="photos of that training (default 10)")
    parser.add_argument("--quick", action="store_true", help="tiny model, CPU, 3 jobs of 2 steps at 64 px")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.device, args.jobs, args.warmup, args.steps, args.size = None, "cpu", 3, 1, 2, 64
    return args


class DispatchPath:
    """One dispatch path: a ledger of its own, its worker and a Runner."""

    def __init__(self, settings: Settings, store: Store, worker):
        self.settings, self.store, self.worker = settings, store, worker
        self.ledger = Ledger(store, settings=settings)
        self.concepts = ConceptService(store, settings.data_dir)
        self.runner = Runner(KindContext(settings, self.concepts, Gallery(store)), self.ledger, worker,
                             Announcer(self.ledger))

    async def imagine(self, args: argparse.Namespace, seed: int) -> float:
        started = time.perf_counter()
        job = await self.ledger.submit("imagine", OWNER, GUILD, CHANNEL, {
            "prompt": "a photo of a lighthouse at dusk", "steps": args.steps, "width": args.size,
            "height": args.size, "count": args.count, "seed": seed})
        await self.runner.run_next()
        seconds = time.perf_counter() - started
        done = await self.ledger.get(job.id)
        if done.status != "succeeded":
            raise SystemExit(f"job {job.id} {done.status}: {done.error}")
        return seconds

    async def train(self, args: argparse.Namespace) -> None:
        import numpy as np
        from PIL import Image

        concept = await self.concepts.create(GUILD, OWNER, "zxqv", "man")
        photos = self.concepts.concept_dir(concept.id) / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        side = min(args.size, 512)
        for i in range(args.photos):  # noise compresses like nothing else: an upper bound for real photos
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
        job = await self.ledger.submit("train", OWNER, GUILD, CHANNEL, {
            "concept_id": concept.id, "steps": args.train_steps, "resolution": side, "prior_preservation": False})
        await self.concepts.attach_job(concept.id, job.id, args.photos)
        await self.runner.run_next()
        done = await self.ledger.get(job.id)
        if done.status != "succeeded":
            raise SystemExit(f"training {job.id} {done.status}: {done.error}")


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "p50_s": round(statistics.median(ordered), 4),
            "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 4),
            "mean_s": round(statistics.fmean(ordered), 4), "min_s": round(ordered[0], 4)}


async def measure(path: DispatchPath, args: argparse.Namespace) -> dict:
    await path.worker.start()
    ready = await path.worker.wait_ready(READY_TIMEOUT_S)
    for i in range(args.warmup):
        await path.imagine(args, seed=i)
    timed = [await path.imagine(args, seed=1000 + i) for i in range(args.jobs)]
    return {"device": ready["device"], **summary(timed)}


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    import ray

    model = prepare_model(args.model, workdir)
    base = replace(Settings(), model=model, device=args.device, dtype=args.dtype, train_slice_s=10.0,
                   imagine_timeout_s=3600, train_timeout_s=3600 * 4)
    result = {"model": args.model or "tiny", "steps": args.steps, "size": args.size, "count": args.count}

    settings = replace(base, data_dir=workdir / "local")
    store = await Store.open(settings.db_path)
    threads = 1 if args.device == "cpu" else None  # as the CPU Ray actor (one CPU each): the same work on both
    local = DispatchPath(settings, store, WorkerClient(worker_command(model=model, data_dir=settings.data_dir,
                                                                      device=args.device, dtype=args.dtype,
                                                                      threads=threads)))
    try:
        result["local"] = await measure(local, args)
    finally:
        await local.worker.stop()
        await store.close()

    gpu = args.device.startswith("cuda")
    ray.init(num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        settings = replace(base, data_dir=workdir / "ray", ray_cpu_workers=0 if gpu else 1)
        store = await Store.open(settings.db_path)
        worker = create_workers(settings, address="a local Ray cluster")[0]
        remote = DispatchPath(settings, store, worker)
        try:
            result["ray"] = await measure(remote, args)
            jobs = args.warmup + args.jobs
            result["ray_bytes_per_imagine"] = {"to_worker": worker.bytes_sent // jobs,
                                               "from_worker": worker.bytes_received // jobs}
            if args.train_steps:
                sent, received = worker.bytes_sent, worker.bytes_received
                await remote.train(args)
                result["ray_bytes_per_train"] = {"steps": args.train_steps, "photos": args.photos,
                                                 "requests": worker.requests - jobs,
                                                 "to_worker": worker.bytes_sent - sent,
                                                 "from_worker": worker.bytes_received - received}
        finally:
            await worker.stop()
            await store.close()
    finally:
        ray.shutdown()
    result["ray_vs_local_p50"] = round(result["ray"]["p50_s"] / result["local"]["p50_s"], 4)
    result["ray_vs_local_mean"] = round(result["ray"]["mean_s"] / result["local"]["mean_s"], 4)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
