"""Benchmark (not a test): what the database's start-up check and a backup cost on a big ledger.

    python -m bench.store_health [--jobs 100000] [--db PATH]

Fills a database with finished /imagine jobs whose params and results are the size production writes (a prompt,
the options, image paths and the A1111 parameters text), then times a cold and a warm `Store.open` (which runs
`PRAGMA quick_check`), `PRAGMA quick_check` and `PRAGMA integrity_check` alone, and one online backup (copy + its
own quick_check). The page cache is the OS's: "cold" is only the first open in this process, not a cold disk.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

from bot.store.backups import Backups
from bot.store.database import Store

PROMPT = "a portrait photo of sks person as a jedi, detailed, cinematic lighting, 85mm, bokeh, highly detailed"


async def fill(db: Path, jobs: int) -> None:
    await (await Store.open(db)).close()
    params = json.dumps({"prompt": PROMPT, "negative": "blurry, lowres", "seed": 1234, "steps": 30, "cfg": 7.5,
                         "width": 512, "height": 512, "count": 4, "scheduler": "dpm++", "concepts": []})
    result = json.dumps({"images": [f"/srv/boothbot/data/images/123456/{i:03d}.png" for i in range(4)],
                         "grid": "/srv/boothbot/data/images/123456/grid.png", "seed": 1234,
                         "parameters": PROMPT + "\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1234"})
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO jobs (kind, owner_id, guild_id, channel_id, params, status, result, gpu_seconds, "
            "created_at, started_at, finished_at, delivered_at) "
            "VALUES ('imagine', ?, 1, 2, ?, 'succeeded', ?, 3.0, ?, ?, ?, ?)",
            ((1000 + i % 500, params, result, t, t + 1, t + 4, t + 5)
             for i, t in ((i, 1.7e9 + i * 10.0) for i in range(jobs))))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


async def run(jobs: int, db: Path) -> dict:
    await fill(db, jobs)
    figures = {"jobs": jobs, "db_mb": db.stat().st_size / 1e6}
    for label in ("open_first_s", "open_again_s"):
        started = time.perf_counter()
        await (await Store.open(db)).close()
        figures[label] = time.perf_counter() - started
    with closing(sqlite3.connect(db)) as conn:
        figures["quick_check_s"] = timed(lambda: conn.execute("PRAGMA quick_check").fetchall())
        figures["integrity_check_s"] = timed(lambda: conn.execute("PRAGMA integrity_check").fetchall())
    backups = Backups(db)
    figures["backup_s"] = timed(lambda: backups.write_now("bench"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--db", type=Path, help="database file to create (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "boothbot.sqlite3"
        figures = asyncio.run(run(args.jobs, db))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
