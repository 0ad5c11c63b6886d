"""Benchmark (not a test): how fast the ledger turns jobs over on this machine.

    python -m bench.ledger [--jobs 2000] [--members 20] [--db PATH]

Phase 1 submits every job (limits and bans checked, as in production); phase 2 drains the queue the way the
dispatcher does (claim_next in fair order, then succeed). Reports jobs/s for each phase and for the whole
submit+claim+finish cycle (the time of one position() on the full queue left out), claim_next latency percentiles
(they grow with the queue's depth) and one position() call with every job waiting.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bot.jobs.ledger import Ledger
from bot.settings import Settings
from bot.store.database import Store


async def run(jobs: int, members: int, db: Path) -> dict:
    settings = replace(Settings(), max_queued_jobs=jobs, trainings_per_day=jobs)
    store = await Store.open(db)
    try:
        ledger = Ledger(store, settings=settings)
        start = time.perf_counter()
        for i in range(jobs):
            await ledger.submit("imagine" if i % 4 else "train", 1000 + i % members, 1, 1, {"prompt": f"job {i}"})
        submitted = time.perf_counter()
        last = (await ledger.list_jobs(limit=1))[0]
        t0 = time.perf_counter()
        await ledger.position(last.id)
        position_ms = (time.perf_counter() - t0) * 1000
        drain_start = time.perf_counter()
        claim_ms = []
        while True:
            t0 = time.perf_counter()
            job = await ledger.claim_next()
            claim_ms.append((time.perf_counter() - t0) * 1000)
            if job is None:
                break
            await ledger.succeed(job.id, {"images": []}, gpu_seconds=1.0)
        drained = time.perf_counter()
    finally:
        await store.close()
    claim_ms.sort()
    return {
        "submit_per_s": jobs / (submitted - start),
        "claim_finish_per_s": jobs / (drained - drain_start),
        "cycle_per_s": jobs / (submitted - start + drained - drain_start),
        "claim_p50_ms": statistics.median(claim_ms),
        "claim_p99_ms": claim_ms[int(len(claim_ms) * 0.99) - 1],
        "position_ms": position_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs to submit and drain (default 2000)")
    parser.add_argument("--members", type=int, default=20, help="distinct job owners (default 20)")
    parser.add_argument("--db", type=Path, help="SQLite file to use (default: a new file in a temp directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "bench.sqlite3"
        result = asyncio.run(run(args.jobs, args.members, db))
    print(f"ledger on {db.name}: {args.jobs} jobs, {args.members} members")
    print(f"  submit              {result['submit_per_s']:8.0f} jobs/s")
    print(f"  claim_next+succeed  {result['claim_finish_per_s']:8.0f} jobs/s")
    print(f"  whole cycle         {result['cycle_per_s']:8.0f} jobs/s")
    print(f"  claim_next latency  p50 {result['claim_p50_ms']:.2f} ms, p99 {result['claim_p99_ms']:.2f} ms")
    print(f"  position() with the whole queue waiting  {result['position_ms']:.1f} ms")


if __name__ == "__main__":
    main()
