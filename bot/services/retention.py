"""Photo retention: the uploaded photos of a concept are deleted BOOTHBOT_PHOTO_RETENTION_DAYS days after its training
ended (0 = at the first sweep after it ended); the trained LoRA and its samples stay.

A sweep runs when the bot starts and then every hour (every minute when the setting is 0). It only touches concepts
whose training job is finished for good: never one that is queued or running, or a training that is waiting for
its next slice (a queued job), since that would resume from its checkpoint and still reads the photos. A failed,
cancelled or interrupted training counts as ended too: it can never resume (a retry is a new /train with new
photos), so its photos and its leftover checkpoint (which holds latents made from the photos) go the same way.
The concept records when its photos went (`photos_deleted_at`), so /concepts can say so.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from bot.services.concepts import concept_dir, remove_tree
from bot.store.database import Store

log = logging.getLogger(__name__)

DAY_S = 24 * 3600
SWEEP_EVERY_S = 3600.0
SWEEP_EVERY_S_AT_ZERO_DAYS = 60.0
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


class PhotoRetention:
    def __init__(self, store: Store, data_dir: Path, days: int, clock: Callable[[], float] = time.time):
        self.store = store
        self.data_dir = Path(data_dir)
        self.days = days
        self.clock = clock
        self._task: asyncio.Task | None = None

    @property
    def interval_s(self) -> float:
        return SWEEP_EVERY_S_AT_ZERO_DAYS if self.days == 0 else SWEEP_EVERY_S

    async def due(self) -> list[int]:
        """Ids of concepts whose photos are due for deletion now."""
        finished = ", ".join(f"'{status}'" for status in FINISHED)
        rows = await self.store.fetchall(
            "SELECT c.id FROM concepts c JOIN jobs j ON j.id = c.job_id"
            " WHERE c.status IN ('ready', 'failed') AND c.photos_deleted_at IS NULL"
            f" AND j.kind = 'train' AND j.status IN ({finished}) AND j.finished_at <= ?"
            " ORDER BY c.id", (self.clock() - self.days * DAY_S,))
        return [row["id"] for row in rows]

    async def sweep(self) -> int:
        """Delete the photos that are due; returns how many concepts lost theirs."""
        swept = 0
        for concept_id in await self.due():
            directory = concept_dir(self.data_dir, concept_id)
            # Files first, then the record: a crash in between leaves the concept due, so the next sweep finishes it
            # (the other order could leave photos on disk that no sweep would look at again).
            await remove_tree(directory / "photos")
            await remove_tree(directory / "checkpoint")
            await self.store.execute("UPDATE concepts SET photos_deleted_at = ? WHERE id = ?", (self.clock(), concept_id))
            swept += 1
        if swept:
            log.info("photo retention: deleted the uploaded photos of %d concept(s) whose training ended more than "
                     "%d day(s) ago", swept, self.days)
        return swept

    # --- the periodic task -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="photo-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next one; the bot goes on
                log.exception("photo retention sweep failed; trying again in %.0f s", self.interval_s)
            await asyncio.sleep(self.interval_s)
