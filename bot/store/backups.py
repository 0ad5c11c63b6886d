"""Online backups of the bot's database into DATA_DIR/backups/, with SQLite's backup API.

A backup is a consistent copy taken while the bot keeps running (WAL: the copy reads one snapshot and blocks no
writer), written to a temporary name, checked with `PRAGMA quick_check`, then renamed, so a file with a backup's
name is always a whole, readable database. Names carry the UTC time and the reason, e.g.
`boothbot-20261201T031500Z-daily.sqlite3` or `...-before-0002.sqlite3`; only the newest `keep` are kept.
Restoring is copying one back over the database while the bot is stopped (README, "Backups").
"""
from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trainer.contract.durations import format_duration
from trainer.contract.files import write_atomic

log = logging.getLogger("boothbot.backups")
DEFAULT_KEEP = 7
DAY_S = 24 * 3600.0
_STAMP = "%Y%m%dT%H%M%SZ"
_NAME = re.compile(r"^(?P<stem>.+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<reason>[a-z0-9-]+)\.sqlite3$")


class BackupError(RuntimeError):
    """A backup could not be written, or the copy did not pass its check (nothing was renamed into place)."""


@dataclass(frozen=True)
class Backup:
    path: Path
    written_at: float  # unix seconds, from the name
    reason: str


class Backups:
    """The backups of one database file, kept in `backups/` next to it."""

    def __init__(self, database: str | Path, *, keep: int = DEFAULT_KEEP, clock: Callable[[], float] = time.time):
        self.database = Path(database)
        self.directory = self.database.parent / "backups"
        self.keep = keep
        self._clock = clock

    def all(self) -> list[Backup]:
        """Every backup of this database, newest first."""
        found = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                match = _NAME.match(path.name)
                if match and match["stem"] == self.database.stem and path.is_file():
                    when = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=timezone.utc).timestamp()
                    found.append(Backup(path, when, match["reason"]))
        return sorted(found, key=lambda b: (b.written_at, b.path.name), reverse=True)

    def newest(self) -> Backup | None:
        backups = self.all()
        return backups[0] if backups else None

    def describe_newest(self) -> str:
        """The newest backup as an operator reads it: path and age, or where backups would be."""
        newest = self.newest()
        if newest is None:
            return f"there is no backup in {self.directory.resolve()}"
        age = format_duration(max(0.0, self._clock() - newest.written_at))
        return f"the newest backup is {newest.path.resolve()} ({age} old)"

    async def write(self, reason: str) -> Backup:
        """Back the database up now (in a thread: the copy and its check read the whole file)."""
        return await asyncio.to_thread(self.write_now, reason)

    def write_now(self, reason: str) -> Backup:
        written_at = self._clock()
        stamp = datetime.fromtimestamp(written_at, timezone.utc).strftime(_STAMP)
        target = self.directory / f"{self.database.stem}-{stamp}-{reason}.sqlite3"
        started = time.perf_counter()
        try:
            write_atomic(target, self._copy_into)
        except (sqlite3.Error, OSError) as error:
            raise BackupError(f"cannot back up {self.database.resolve()} into {self.directory.resolve()}: "
                              f"{error}") from error
        seconds = time.perf_counter() - started
        removed = self._rotate()
        log.info("database backup written: %s (%.1f MB, %s, checked, %.2f s)%s", target.resolve(),
                 target.stat().st_size / 1e6, reason, seconds,
                 f"; removed {removed} older one(s), keeping {self.keep}" if removed else "")
        return Backup(target, datetime.strptime(stamp, _STAMP).replace(tzinfo=timezone.utc).timestamp(), reason)

    def _copy_into(self, path: Path) -> None:
        # A connection of its own: the copy never waits for the Store's statements, nor they for it.
        with closing(sqlite3.connect(self.database, timeout=30.0)) as source, \
                closing(sqlite3.connect(path)) as copy:
            source.backup(copy)  # all pages in one step: one consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
            problems = [row[0] for row in copy.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"the copy failed its check: {problems[0]}")

    def _rotate(self) -> int:
        removed = 0
        for old in self.all()[self.keep:]:
            old.path.unlink(missing_ok=True)
            removed += 1
        # A copy cut short (the bot killed mid-backup) leaves its temporary file: gone once it is an hour old.
        for stale in self.directory.glob(f".{self.database.stem}-*.tmp"):
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink(missing_ok=True)
        return removed


class BackupSchedule:
    """Writes a backup whenever the newest is `interval_s` old: at once when the bot starts with none younger, then
    daily while it runs. `clock` and `sleep` are injectable so tests can drive days without waiting for them."""

    def __init__(self, backups: Backups, *, interval_s: float = DAY_S, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep, retry_s: float = 3600.0):
        self.backups = backups
        self.interval_s = interval_s
        self.retry_s = retry_s
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task | None = None

    def due_in_s(self) -> float:
        newest = self.backups.newest()
        if newest is None:
            return 0.0
        return newest.written_at + self.interval_s - self._clock()

    async def run(self) -> None:
        while True:
            wait_s = self.due_in_s()
            if wait_s > 0:
                await self._sleep(wait_s)
                continue
            try:
                await self.backups.write("daily")
            except BackupError as error:  # a full disk must not stop the bot; the next try may succeed
                log.error("%s; trying again in %s", error, format_duration(self.retry_s))
                await self._sleep(self.retry_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="database-backups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
