"""Class images ready before anyone asks: once the queue has run empty, the dispatcher sends the worker one `prefill`
naming the classes members train most (from the concepts they made), then a default set. The worker makes whatever
is missing of those class-image sets until any request arrives (trainer/training/prefill.py), so a member's job
waits at most one batch of images; the next time the queue runs empty after more work, it is sent again and a set
left half made goes on."""
from __future__ import annotations

import logging

from bot.dispatch.worker_api import GpuWorker
from bot.store.database import Store

log = logging.getLogger("boothbot.dispatcher")

DEFAULT_CLASSES = ("man", "woman", "person", "boy", "girl", "dog", "cat", "style")
MOST_USED = 8


async def classes_to_prefill(store: Store, most_used: int = MOST_USED) -> list[str]:
    """The classes of the most concepts first (ties: alphabetical), then the default set; each once."""
    async with store.read() as db:
        rows = await db.fetchall("SELECT class_name, COUNT(*) AS n FROM concepts GROUP BY class_name "
                                 "ORDER BY n DESC, class_name LIMIT ?", (most_used,))
    return list(dict.fromkeys([row["class_name"] for row in rows] + list(DEFAULT_CLASSES)))


class IdlePrefill:
    def __init__(self, store: Store, worker: GpuWorker):
        self.store = store
        self.worker = worker
        self.sent = 0  # prefills sent (logs, tests)
        self._due = True  # once after start, then once after each busy spell

    def work_ran(self) -> None:
        self._due = True

    async def queue_empty(self) -> None:
        if not self._due:
            return
        self._due = False
        classes = await classes_to_prefill(self.store)
        log.info("the queue is empty: class images for %s are made while the GPU is idle", ", ".join(classes))
        self.sent += 1
        await self.worker.prefill(classes)
