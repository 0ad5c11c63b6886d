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


# /train's parts, in the order a training goes through them; the engine's own phases come from the result's
# `timings` (trainer/training/engine.py), summed over the training's runs
TRAIN_PARTS = {
    "command_to_queued_s": "command sent -> job row written (the photos downloaded and checked, the submit)",
    "queued_to_started_s": "job row -> first claimed for the worker",
    "worker_s": "first claimed -> finished (every run of the training, and what ran between them)",
    "others_between_s": "of which other members' jobs run between its runs (their claim -> finish)",
    "engine_class_images_s": "of which the engine: class images (and their latents' chunks)",
    "engine_inputs_s": "of which the engine: the photos' latents, the prompts",
    "engine_adapters_s": "of which the engine: LoRA adapters, optimiser",
    "engine_steps_s": "of which the engine: the training steps (previews and periodic checkpoints included)",
    "engine_save_s": "of which the engine: the LoRA files",
    "engine_samples_s": "of which the engine: the samples",
    "finished_to_posted_s": "job finished -> the \"ready\" post seen by Discord (samples uploaded)",
}


def train_breakdown(db_path: Path, nth: int, sent: float, posted: float, clock: WallClock) -> dict:
    """Where the `nth` (0-based) /train job of the run spent the time from `sent` to `posted` (monotonic seconds);
    {} when that job or its times are not in the database."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM jobs WHERE kind = 'train' ORDER BY id")]
        if nth >= len(ids):
            return {}
        rows = job_rows(db_path, [ids[nth]])
        created, started, finished, result = rows[ids[nth]]
        if None in (created, started, finished):
            return {}
        others = db.execute("SELECT COALESCE(SUM(finished_at - claimed_at), 0) FROM jobs WHERE id != ? "
                            "AND claimed_at >= ? AND finished_at <= ?", (ids[nth], started, finished)).fetchone()[0]
    parts = {"command_to_queued_s": created - clock.wall(sent), "queued_to_started_s": started - created,
             "worker_s": finished - started, "others_between_s": others}
    for phase, value in (result.get("timings") or {}).items():
        if f"engine_{phase}_s" in TRAIN_PARTS:
            parts[f"engine_{phase}_s"] = value
    parts["finished_to_posted_s"] = clock.wall(posted) - finished
    return {name: round(value, 3) for name, value in parts.items()}
