"""How late an asyncio event loop wakes up: a task sleeps a short interval over and over and records the lateness.

Used by `bench.lag` (the worker busy with torch) and, inside the bot process, by `bench.wire.bot_probes`
(`bench.burst`). Each sample carries its wall-clock time, so a run can keep only the samples of one phase.
"""
from __future__ import annotations

import asyncio
import statistics
import time


class LagProbe:
    """Sleeps `interval_s` again and again and records how much later than asked it woke up."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.times: list[float] = []  # time.time() at the end of each sample
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.samples_ms.append((time.perf_counter() - started - self.interval_s) * 1000)
            self.times.append(time.time())

    def start(self) -> None:
        self.samples_ms, self.times = [], []
        self._task = asyncio.create_task(self._run(), name="lag-probe")

    async def stop(self) -> list[float]:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return self.samples_ms


def summarize(samples_ms: list[float]) -> dict:
    if len(samples_ms) < 2:
        return {"samples": len(samples_ms)}
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"samples": len(samples_ms), "p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2),
            "max_ms": round(max(samples_ms), 2)}
