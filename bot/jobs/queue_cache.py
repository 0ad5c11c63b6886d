"""The queue's plan (every running and waiting job with its place and ETA), worked out once per change of the
database and shared by every view of it: each new job's status message, /queue, the refresh after a job ends.

Working the plan out reads every waiting job, so doing it per view made a burst of N submissions cost N² rows. A
plan is kept with SQLite's `data_version` of the read that made it (it changes whenever anything is committed), so
a view reuses it until something changed or it is `MAX_AGE_S` old (fair order and ETAs also move with the clock).
Views that arrive while a plan is being worked out share the next one instead of each starting their own.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from bot.jobs.scheduler import QueueEntry
from bot.store.database import Reader, Store

MAX_AGE_S = 5.0


class QueuePlan:
    """Running jobs, then waiting jobs in the order they should run, with places and ETAs (scheduler.plan)."""

    def __init__(self, entries: list[QueueEntry], made_at: float):
        self.entries = tuple(entries)
        self.made_at = made_at  # the Ledger clock's time the ETAs are counted from
        self._by_job = {entry.job.id: entry for entry in self.entries}
        # The queue only moves while something runs: waiting jobs' ETAs shrink with the clock until then.
        self._running_s = max((e.eta_s for e in self.entries if e.position is None), default=0.0)

    def entries_at(self, now: float) -> list[QueueEntry]:
        """The entries with their ETAs counted from `now` instead of from when the plan was made."""
        if now <= self.made_at:
            return list(self.entries)
        return [self._aged(entry, now) for entry in self.entries]

    def entry_at(self, job_id: int, now: float) -> QueueEntry | None:
        entry = self._by_job.get(job_id)
        return None if entry is None else self._aged(entry, now)

    def _aged(self, entry: QueueEntry, now: float) -> QueueEntry:
        elapsed = max(0.0, now - self.made_at)
        passed = elapsed if entry.position is None else min(elapsed, self._running_s)
        return replace(entry, eta_s=max(0.0, entry.eta_s - passed)) if passed else entry


class QueueCache:
    """`await cache.plan()`: the current QueuePlan. `work_out(db)` reads the queue through `db` (inside one read
    transaction) and returns the plan."""

    def __init__(self, store: Store, work_out: Callable[[Reader | Store], Awaitable[QueuePlan]],
                 clock: Callable[[], float], *, max_age_s: float = MAX_AGE_S):
        self.store = store
        self.work_out = work_out
        self.clock = clock  # the Ledger's: fair order and ETAs move with it
        self.max_age_s = max_age_s
        self._plan: QueuePlan | None = None
        self._version: int | None = None   # data_version of the read that made the plan
        self._checked = 0                  # the last check (refresh or version check) that vouched for the plan
        self._checks = 0                   # checks begun so far
        self._lock = asyncio.Lock()
        self.worked_out = 0                # how many times the queue was read (tests and benchmarks look)

    async def plan(self) -> QueuePlan:
        arrived = self._checks
        async with self._lock:
            if self._plan is not None and self._checked > arrived:
                return self._plan  # vouched for by a check that began after this call did
            self._checks += 1
            check = self._checks
            async with self.store.read() as db:
                if not isinstance(db, Reader):  # inside this task's own write transaction: see its writes, no cache
                    return await self.work_out(db)
                version = await db.data_version()
                fresh = self._plan is not None and 0.0 <= self.clock() - self._plan.made_at < self.max_age_s
                if not fresh or version != self._version:
                    self._plan, self._version = await self.work_out(db), version
                    self.worked_out += 1
            self._checked = check
            return self._plan
