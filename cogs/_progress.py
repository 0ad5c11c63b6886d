"""Throttling of progress-message edits: at most one edit per message every `interval` seconds.

Discord rate-limits message edits per channel; progress events come far faster than that. An update that arrives
inside the interval is not dropped: the latest one is kept and sent when the interval is over (so the message never
stays behind the job by more than the interval), and `flush`/`forget` let the final delivery overtake it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Edit = Callable[[], Awaitable[None]]
log = logging.getLogger(__name__)


@dataclass
class _Slot:
    last: float = float("-inf")
    pending: Edit | None = None
    timer: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EditThrottle:
    def __init__(self, interval: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._slots: dict[object, _Slot] = {}

    async def submit(self, key: object, edit: Edit) -> None:
        """Run `edit` now if the key's interval is over, else remember it as the one to run when it is."""
        slot = self._slots.setdefault(key, _Slot())
        wait = slot.last + self.interval - self.clock()
        if wait > 0:
            slot.pending = edit
            if slot.timer is None or slot.timer.done():
                slot.timer = asyncio.create_task(self._later(key, slot, wait))
            return
        slot.pending = None
        await self._run(slot, edit)

    async def _later(self, key: object, slot: _Slot, wait: float) -> None:
        await asyncio.sleep(wait)
        edit, slot.pending = slot.pending, None
        if edit is not None and self._slots.get(key) is slot:
            try:
                await self._run(slot, edit)
            except Exception:  # noqa: BLE001 - nobody awaits this task; a failed cosmetic edit is only logged
                log.exception("a delayed message edit for %s failed", key)

    async def _run(self, slot: _Slot, edit: Edit) -> None:
        async with slot.lock:
            slot.last = self.clock()
            await edit()

    def forget(self, key: object) -> None:
        """Drop a pending edit (the job finished; its final message replaces the progress)."""
        slot = self._slots.pop(key, None)
        if slot is not None and slot.timer is not None and not slot.timer.done():
            slot.timer.cancel()

