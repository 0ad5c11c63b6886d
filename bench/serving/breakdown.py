"""Where an /imagine's time went between the member's command and the result post, from the bench's own clock (sent,
posted) and what the bot wrote in its database (the job's created, started and finished times; the engine's seconds
in its result). Both processes read the same wall clock, so the parts add up to what the member waited."""
from __future__ import annotations

import json
import sqlite3
import statistics
import time
from pathlib import Path

# part -> what it covers, in the order a job goes through them
PARTS = {
    "command_to_queued_s": "command sent -> job row written (Discord's interaction, the bot's checks, the submit)",
    "queued_to_started_s": "job row -> claimed for the worker (the dispatcher; batch window)",
    "worker_s": "claimed -> the worker's end event handled (request out, engine, result back, result kept)",
    "engine_s": "of which the engine: options checked -> images written (the worker's own clock)",
    "finished_to_posted_s": "job finished -> result post seen by Discord (render, upload)",
}


class WallClock:
    """Turns the bench's monotonic times into the wall-clock times the bot writes."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()

    def wall(self, monotonic: float) -> float:
        return monotonic + self.offset


def job_rows(db_path: Path, job_ids: list[int]) -> dict[int, tuple]:
    """job id -> (created_at, started_at, finished_at, result dict), read-only beside the running bot."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        marks = ",".join("?" * len(job_ids))
        rows = db.execute(f"SELECT id, created_at, started_at, finished_at, result FROM jobs WHERE id IN ({marks})",
                          job_ids).fetchall()
    return {row[0]: (row[1], row[2], row[3], json.loads(row[4] or "{}")) for row in rows}


def imagine_breakdown(db_path: Path, jobs: list[tuple[int, float, float]], clock: WallClock) -> dict:
    """The median of each part over `jobs` ((job id, sent, posted) in monotonic seconds); {} when none was found."""
    rows = job_rows(db_path, [job_id for job_id, _, _ in jobs]) if jobs else {}
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for job_id, sent, posted in jobs:
        if job_id not in rows or None in rows[job_id][:3]:
            continue
        created, started, finished, result = rows[job_id]
        parts["command_to_queued_s"].append(created - clock.wall(sent))
        parts["queued_to_started_s"].append(started - created)
        parts["worker_s"].append(finished - started)
        if result.get("seconds") is not None:
            parts["engine_s"].append(float(result["seconds"]))
        parts["finished_to_posted_s"].append(clock.wall(posted) - finished)
    return {name: round(statistics.median(values), 4) for name, values in parts.items() if values}
