"""Gallery: the images table, which records who owns every generated image (for /forget and follow-up buttons)."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.store.database import Store


@dataclass(frozen=True)
class Image:
    id: int
    job_id: int
    owner_id: int
    guild_id: int
    path: str
    seed: int | None
    prompt: str
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Image:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


class Gallery:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock

    async def add(self, job_id: int, owner_id: int, guild_id: int, paths: Sequence[str],
                  seeds: Sequence[int | None], prompt: str) -> None:
        """Record one job's images; `seeds[i]` belongs to `paths[i]` (pass [] when unknown)."""
        if seeds and len(seeds) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(seeds)} seeds")
        seeds = list(seeds) or [None] * len(paths)
        now = self.clock()
        await self.store.executemany(
            "INSERT INTO images (job_id, owner_id, guild_id, path, seed, prompt, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(job_id, owner_id, guild_id, str(path), seed, prompt, now) for path, seed in zip(paths, seeds)])

    async def for_job(self, job_id: int) -> list[Image]:
        rows = await self.store.fetchall("SELECT * FROM images WHERE job_id = ? ORDER BY id", (job_id,))
        return [Image.from_row(row) for row in rows]

    async def for_member(self, guild_id: int, owner_id: int, limit: int = 50) -> list[Image]:
        """Newest first."""
        rows = await self.store.fetchall(
            "SELECT * FROM images WHERE guild_id = ? AND owner_id = ? ORDER BY id DESC LIMIT ?",
            (guild_id, owner_id, limit))
        return [Image.from_row(row) for row in rows]
