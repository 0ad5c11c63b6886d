"""`python -m bench.lag`: event-loop lag in the bot process while the GPU worker is busy with heavy torch work.

A benchmark, not a test. The bot process here does what it does while a job runs: it reads the worker's events
from the pipe and records each progress event in a real SQLite ledger. A probe task sleeps `--interval-ms` over and
over and records how late it wakes up; p50/p99 of that lateness, idle and busy, are the numbers. Goal: p99 <= 20 ms.

Workloads: `selftest` (square matmuls, bf16 on CUDA: the GPU saturated and the worker's CPU thread launching
kernels) needs no model; `imagine` runs real /imagine jobs on `--model` (a diffusers directory, or `random-sd15`:
the SD 1.5 architecture with random weights, built and saved first; see ../shared/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.loop_probe import LagProbe, summarize
from bot.jobs.ledger import Ledger
from bot.settings import Settings
from bot.store.database import Store
from bot.dispatch.worker_client import WorkerClient, worker_command

GOAL_P99_MS = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lag", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("selftest", "imagine"), default="selftest")
    parser.add_argument("--model", default=None,
                        help="for --workload imagine: a diffusers directory or random-sd15 (default: tiny random)")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the worker is kept busy")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="baseline with the worker idle")
    parser.add_argument("--size", type=int, default=None, help="selftest matrix size (default 8192 on CUDA, 512 CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in the worker")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="probe sleep (default 5 ms)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def prepare_model(model: str | None, workdir: Path) -> str:
    """The model directory to load; built in a subprocess, so torch never loads in this (the bot's) process."""
    if model not in (None, "random-sd15"):
        return model
    if model is None:
        target = workdir / "tiny-model"
        command = [sys.executable, "-m", "trainer", "make-tiny-model", str(target)]
    else:
        target = workdir / "random-sd15"
        print("building the random-weight SD 1.5 pipeline (once)...", file=sys.stderr, flush=True)
        command = [sys.executable, "-c", "import sys, torch; from bench.sd15 import build_sd15_pipeline; "
                   "build_sd15_pipeline('cpu').to(torch.float16).save_pretrained(sys.argv[1])", str(target)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return str(target)


async def bench(args: argparse.Namespace, workdir: Path) -> dict:
    settings = replace(Settings(), data_dir=workdir / "data")
    store = await Store.open(settings.db_path)
    ledger = Ledger(store, settings=settings)
    model = prepare_model(args.model, workdir) if args.workload == "imagine" else None
    worker = WorkerClient(worker_command(model=model, data_dir=settings.data_dir, device=args.device,
                                         dtype=args.dtype, threads=args.threads))
    await worker.start()
    try:
        ready = await worker.wait_ready(1800)
        probe = LagProbe(args.interval_ms / 1000)
        probe.start()
        await asyncio.sleep(args.idle_seconds)
        idle = summarize(await probe.stop())

        job = await ledger.submit("imagine", 1, 1, None, {})  # a ledger row for the progress writes
        await ledger.claim(job.id)
        progress_events = 0

        async def record(event: dict) -> None:  # what the dispatcher does with every progress event
            nonlocal progress_events
            progress_events += 1
            await ledger.record_progress(job.id, event["step"], event["total"], event.get("eta_s"),
                                         event.get("preview"))

        probe.start()
        started = time.perf_counter()
        ends = []
        if args.workload == "selftest":
            params = {"seconds": args.seconds, "step_s": 0.1}
            if args.size:
                params["size"] = args.size
            elif not ready["device"].startswith("cuda"):
                params["size"] = 512  # on a GPU the worker's default (8192) applies
            ends.append(await worker.run(job.id, "selftest", params, on_progress=record))
        else:
            while time.perf_counter() - started < args.seconds:
                params = {"prompt": "a photo of a dog", "steps": 30, "count": 4, "seed": len(ends),
                          "out_dir": str(workdir / "images" / str(len(ends))), "job_id": job.id}
                ends.append(await worker.run(job.id, "imagine", params, on_progress=record))
        busy_s = time.perf_counter() - started
        busy = summarize(await probe.stop())
        failed = [e for e in ends if e["event"] != "done"]
        if failed:
            raise RuntimeError(f"the workload failed: {failed[0].get('error')} {failed[0].get('detail', '')}")
        workload = ends[0]["result"] if args.workload == "selftest" else {"images": 4 * len(ends)}
        return {"device": ready["device"], "dtype": ready["dtype"], "workload": args.workload,
                "worker": workload, "busy_s": round(busy_s, 1), "progress_events_recorded": progress_events,
                "interval_ms": args.interval_ms, "idle": idle, "busy": busy, "goal_p99_ms": GOAL_P99_MS,
                "goal_met": busy.get("p99_ms", 1e9) <= GOAL_P99_MS, "cpu_count": os.cpu_count(),
                "worker_threads": args.threads}
    finally:
        await worker.stop()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="boothbot-lag-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"event-loop lag in the bot process (probe sleeps {args.interval_ms:g} ms; lateness), "
          f"worker on {result['device']} ({result['dtype']}), {result['cpu_count']} CPUs")
    print(f"{'phase':<6} {'samples':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("idle", "busy"):
        s = result[phase]
        print(f"{phase:<6} {s['samples']:>8} {s.get('p50_ms', '-'):>8} {s.get('p99_ms', '-'):>8} "
              f"{s.get('max_ms', '-'):>8}")
    print(f"busy: {result['workload']} for {result['busy_s']} s: {result['worker']}; "
          f"{result['progress_events_recorded']} progress events recorded in SQLite")
    print(f"goal p99 <= {GOAL_P99_MS:g} ms: {'met' if result['goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
