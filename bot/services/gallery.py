"""Gallery: the images table, which records who owns every generated image (for /forget and follow-up buttons)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bot.store.database import Store


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
