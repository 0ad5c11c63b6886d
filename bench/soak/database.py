"""Reading the bot's SQLite file from outside the bot, with Python's sqlite3 (read-only: the soak changes nothing)."""
from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "interrupted"})


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    status: str
    token: str | None          # a training's token (its concept); None for /imagine
    error: str | None
    delivered: bool
    attempts: int

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


def _connect(db_path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30))


def read_jobs(db_path: Path) -> dict[int, JobRow]:
    """Every job in the file. Safe while the bot runs (WAL: a reader never blocks the bot's writes)."""
    if not db_path.exists():
        return {}
    with _connect(db_path) as db:
        rows = db.execute("SELECT id, kind, status, params, error, delivered_at, attempts FROM jobs").fetchall()
    out = {}
    for job_id, kind, status, params, error, delivered_at, attempts in rows:
        token = json.loads(params or "{}").get("token") if kind == "train" else None
        out[job_id] = JobRow(job_id, kind, status, token, error, delivered_at is not None, attempts)
    return out


def integrity(db_path: Path) -> str:
    """`PRAGMA integrity_check`: "ok", or what SQLite found wrong. Call it while the bot is down."""
    with _connect(db_path) as db:
        return "; ".join(row[0] for row in db.execute("PRAGMA integrity_check").fetchall())
