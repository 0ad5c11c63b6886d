"""Store: the bot's one SQLite file (WAL, foreign keys, busy timeout) and its numbered migrations.

Each Store owns one aiosqlite connection in autocommit mode. Statements from different coroutines on the same
Store are serialised by a lock, so a transaction opened with `immediate()` never sees another coroutine's statements
slip in. Several Stores (or processes) on the same file coordinate through SQLite's own locking: `BEGIN IMMEDIATE`
takes the write lock up front, and the busy timeout makes a second writer wait instead of failing. Opening only
reads unless something must change (bot/store/backups.py copies the file before a migration does).
Reads that need one consistent view of several tables use `read()`: a read transaction on a second, read-only
connection, which in WAL mode neither takes nor waits for the write lock (and does not queue behind writers).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bot.errors import SetupError
from bot.store.backups import BackupError, Backups
from trainer.contract.durations import format_duration

log = logging.getLogger("boothbot.store")
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# How long opening waits for a write lock it needs (a migration) while another process holds it; generous, since
# that may be an operator's database tool (BOOTHBOT_DB_LOCK_WAIT_S). The bot's own writes hold it for milliseconds.
LOCK_WAIT_S = 120.0
FIRST_TRY_S = 1.0  # of which this long before the wait is worth a log line
LOCK_LOG_EVERY_S = 15.0
T = TypeVar("T")
READER_BUSY_TIMEOUT_S = 30.0  # a WAL reader waits only in rare cases (e.g. another process recovering the WAL)
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# The Store whose transaction the current task is inside; its statements then skip the lock they already hold.
_transaction_owner: contextvars.ContextVar[Store | None] = contextvars.ContextVar("boothbot_tx", default=None)
# The read transaction (see Store.read) the current task is inside; a nested read() joins it.
_open_read: contextvars.ContextVar[Reader | None] = contextvars.ContextVar("boothbot_read", default=None)


class MigrationError(RuntimeError):
    """A migration file is misnamed, conflicts with what the database recorded, or failed (and was rolled back)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def find_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is also used by {found[version].path.name}")
        found[version] = Migration(version, path.stem, path)
    return [found[v] for v in sorted(found)]


def split_statements(script: str) -> list[str]:
    """Split SQL on ';' where SQLite agrees a statement ends (so trigger bodies and quoted ';' stay whole)."""
    statements, buffer = [], ""
    pieces = script.split(";")
    for index, piece in enumerate(pieces):
        buffer += piece if index == len(pieces) - 1 else piece + ";"
        if sqlite3.complete_statement(buffer):
            if _strip_comments(buffer).strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if _strip_comments(buffer).strip(" \t\r\n;"):
        raise MigrationError(f"unterminated SQL statement: {buffer.strip()[:80]!r}")
    return statements


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def _is_locked(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(error)


def damaged_message(path: Path, detail: str, backups: Backups) -> str:
    """What to tell the operator about a damaged database: which file, the newest backup and how to put it back."""
    path = path.resolve()
    newest = backups.newest()
    aside = f"move {path.name} and any {path.name}-wal and {path.name}-shm beside it out of {path.parent}"
    if newest is None:
        return (f"the database {path} is damaged ({detail}) and {backups.describe_newest()}: {aside} to start with "
                "an empty database (its jobs and concepts are then forgotten), or put a copy of your own in its place")
    return (f"the database {path} is damaged ({detail}); {backups.describe_newest()}. To restore it, with the bot "
            f"stopped: {aside}, then cp {newest.path.resolve()} {path} (jobs and concepts changed since that backup "
            "are lost; README: Backups)")


def _unusable(path: Path, error: sqlite3.Error, waited_s: float, backups: Backups) -> SetupError | None:
    """The SetupError for a database file this process cannot use at all, or None for any other error."""
    path = path.resolve()
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if _is_locked(error):
        return SetupError(f"the database {path} is in use by another process (still locked after {waited_s:.0f} s): "
                          "stop the other program using it (another boothbot with the same BOOTHBOT_DATA_DIR, or a "
                          "database tool with an open transaction), or set BOOTHBOT_DATA_DIR to another directory")
    if code == sqlite3.SQLITE_NOTADB:
        return SetupError(f"{path} is not a SQLite database ({error}): move that file away, or set "
                          "BOOTHBOT_DATA_DIR to another directory")
    if code == sqlite3.SQLITE_CORRUPT:
        return SetupError(damaged_message(path, str(error), backups))
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        if path.is_dir():
            return SetupError(f"{path} is a directory, not the database file: move it away, or set "
                              "BOOTHBOT_DATA_DIR to another directory")
        return SetupError(f"cannot open the database {path} for writing ({error}): make it and its directory "
                          "writable for this user, or set BOOTHBOT_DATA_DIR to another directory")
    return None


async def _connect(path: Path) -> tuple[aiosqlite.Connection, sqlite3.Connection]:
    """aiosqlite.connect, except that a file SQLite cannot open fails here, before aiosqlite starts its thread: a
    failed aiosqlite.connect leaves that thread to report to an event loop that is closed by then, which prints a
    traceback after the bot's one-line message. Returns the aiosqlite connection and the sqlite3 one beneath it
    (for `Store.run`; any thread may use it, one at a time: the Store's lock sees to that)."""
    raw = await asyncio.to_thread(sqlite3.connect, str(path), isolation_level=None, check_same_thread=False)
    return await aiosqlite.Connection(lambda: raw, iter_chunk_size=64), raw


class _LockWait:
    """Retries what another process's lock refused, for up to `wait_s` in all, saying so in the log: once after
    the first second (a writer holds the lock for milliseconds), then every LOCK_LOG_EVERY_S."""

    def __init__(self, path: Path, wait_s: float):
        self.path = path.resolve()
        self.wait_s = wait_s
        self._started = time.monotonic()
        self._logged_at: float | None = None

    async def retry(self, action: Callable[[], Awaitable[T]], why: str) -> T:
        while True:
            try:
                return await action()
            except sqlite3.OperationalError as error:
                if not _is_locked(error):
                    raise
                waited = time.monotonic() - self._started
                if waited >= self.wait_s:
                    raise
                self._log(waited, why)
                await asyncio.sleep(0.05)

    def _log(self, waited: float, why: str) -> None:
        if waited < FIRST_TRY_S or (self._logged_at is not None and waited - self._logged_at < LOCK_LOG_EVERY_S):
            return
        if self._logged_at is None:
            log.warning("the database %s is locked by another process (another boothbot with the same "
                        "BOOTHBOT_DATA_DIR, or a database tool such as sqlite3 or DB Browser with an open "
                        "transaction); waiting up to %s for it %s", self.path, format_duration(self.wait_s), why)
        else:
            log.warning("still waiting for the database %s: locked by another process for %s; giving up after %s",
                        self.path, format_duration(waited), format_duration(self.wait_s))
        self._logged_at = waited


async def _to_the_end(statement: Awaitable[Any]) -> Any:
    """Await a statement to its end even if the awaiting task is cancelled meanwhile (the cancel is raised after).

    aiosqlite runs a statement it was handed whatever happens to the task that awaits it, so after a cancelled
    `BEGIN` the connection may be inside a transaction nobody ends, and every later `BEGIN` fails; waiting for the
    statement lets the caller know the connection's state and end the transaction.
    """
    task = asyncio.ensure_future(statement)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


async def _end_transaction(conn: aiosqlite.Connection, how: str) -> None:
    """COMMIT or ROLLBACK the connection's open transaction, if it has one (and only then)."""
    if conn.in_transaction:
        await _to_the_end(conn.execute(how))


class Reader:
    """Statements of one read transaction on a Store's read-only connection (what `Store.read()` yields)."""

    def __init__(self, store: Store, conn: aiosqlite.Connection):
        self.store = store
        self.conn = conn

    async def fetchone(self, sql: str, params: Sequence[Any] | dict = ()) -> sqlite3.Row | None:
        """The first row of a query of one row (all its rows are read: see Store.fetchall)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] | dict = ()) -> list[sqlite3.Row]:
        return list(await self.conn.execute_fetchall(sql, params))

    async def fetchval(self, sql: str, params: Sequence[Any] | dict = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    async def data_version(self) -> int:
        """Changes whenever any other connection (this Store's writer included) has committed since the last call:
        a change counter for the whole database, for caches of what was read."""
        return await self.fetchval("PRAGMA data_version")


class Store:
    """One connection to the bot's database. Create with `await Store.open(path)`; `await close()` when done."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, raw: sqlite3.Connection):
        self._conn = conn
        self._raw = raw  # the sqlite3 connection beneath _conn, for run()
        self.path = path
        self._lock = asyncio.Lock()
        self._reader: Reader | None = None  # opened by the first read()
        self._reader_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, *, busy_timeout_s: float = 30.0, lock_wait_s: float = LOCK_WAIT_S,
                   migrations_dir: Path = MIGRATIONS_DIR, backups: Backups | None = None) -> Store:
        """Open (creating it if needed), check and migrate the database.

        Nothing here takes the write lock unless there is something to change (a new file to turn to WAL, a
        pending migration), so a bot starts while another process writes. A lock it does need is waited for up
        to `lock_wait_s`; a migration is preceded by a backup (`backups`, default: backups/ beside the file).
        A file that stays locked, is damaged, is not a database or cannot be written raises SetupError saying
        what to do.
        """
        path = Path(path)
        migrations = find_migrations(migrations_dir)
        backups = backups or Backups(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return await cls._open(path, migrations, busy_timeout_s, _LockWait(path, lock_wait_s), backups)
        except sqlite3.Error as error:
            unusable = _unusable(path, error, lock_wait_s, backups)
            if unusable is None:
                raise
            raise unusable from error
        except BackupError as error:
            raise SetupError(f"{error}; the database was not migrated without a backup: free some space in "
                             f"{backups.directory.resolve()} (or make it writable), then start again") from error

    @classmethod
    async def _open(cls, path: Path, migrations: list[Migration], busy_timeout_s: float, lock: _LockWait,
                    backups: Backups) -> Store:
        conn, raw = await _connect(path)
        conn.row_factory = sqlite3.Row
        store = cls(conn, path, raw)
        try:
            # Each attempt waits this long inside SQLite; _LockWait retries (and logs) up to its limit.
            await conn.execute(f"PRAGMA busy_timeout = {int(min(FIRST_TRY_S, lock.wait_s) * 1000)}")
            await lock.retry(store._use_wal, "to switch it to WAL mode")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash loses no committed data
            await lock.retry(lambda: store._check_intact(backups), "to check it")
            pending = await lock.retry(lambda: store._pending(migrations), "to read its schema version")
            if pending:
                names = ", ".join(m.path.name for m in pending)
                await lock.retry(lambda: store._migrate(migrations, backups), f"to apply {names}")
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        except BaseException:
            await conn.close()
            raise
        return store

    async def _use_wal(self) -> None:
        """Turning a file to WAL needs it to itself (and SQLite answers "locked" at once rather than waiting when
        another connection opens it at the same moment); a file already in WAL needs nothing."""
        if await self.fetchval("PRAGMA journal_mode") != "wal":
            await self._conn.execute("PRAGMA journal_mode = WAL")

    async def _check_intact(self, backups: Backups) -> None:
        """`PRAGMA quick_check` reads every page (about a second for 100k jobs on a busy 2-core machine:
        docs/BENCHMARKS.md), so a damaged file is refused at start, naming the newest backup, instead of failing
        some command later."""
        problems = [row[0] for row in await self.fetchall("PRAGMA quick_check")]
        if problems != ["ok"]:
            more = f", and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
            raise SetupError(damaged_message(self.path, problems[0] + more, backups))

    async def close(self) -> None:
        await self._close_reader()
        await self._conn.close()


    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- statements ---------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if _transaction_owner.get() is self:
            yield
            return
        async with self._lock:
            yield

    async def execute(self, sql: str, params: Sequence[Any] | dict = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        async with self._turn():
            cursor = await self._conn.execute(sql, params)
            try:
                return cursor.rowcount
            finally:
                await cursor.close()

    async def insert(self, sql: str, params: Sequence[Any] | dict = ()) -> int:
        """Run one INSERT; returns the new row's id."""
        async with self._turn():
            cursor = await self._conn.execute(sql, params)
            try:
                return cursor.lastrowid
            finally:
                await cursor.close()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._turn():
            await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] | dict = ()) -> sqlite3.Row | None:
        """The first row of a query of one row (all its rows are read: see fetchall)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] | dict = ()) -> list[sqlite3.Row]:
        # One hand-off to aiosqlite's thread (execute, fetch and close together) rather than three: under a burst
        # every hand-off is a turn of the connection's queue and a wake-up of the event loop.
        async with self._turn():
            return list(await self._conn.execute_fetchall(sql, params))

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)` in a worker thread, in this Store's turn (inside the caller's transaction, if any):
        any number of statements for one hand-off, e.g. a group of submissions (bot/jobs/ledger.py). `work` uses
        the plain sqlite3 connection (rows are sqlite3.Row) and must leave no transaction open that it began.

        aiosqlite offers no public way to run a function in its own thread, so this runs in asyncio's default
        executor: the connection allows any thread, and the Store's lock keeps everyone else off it meanwhile.
        Awaited to the end even if the caller is cancelled, so the lock is never released while `work` runs."""
        async with self._turn():
            return await _to_the_end(asyncio.to_thread(work, self._raw))

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Store]:
        """This Store's connection to the current task alone for the block, without beginning a transaction: what
        `run` and the statements in the block do takes no further turn (e.g. to decide what to write only once the
        turn came). Like `immediate()`, do not start tasks inside the block."""
        if _transaction_owner.get() is self:
            yield self
            return
        async with self._lock:
            token = _transaction_owner.set(self)
            try:
                yield self
            finally:
                _transaction_owner.reset(token)

    def in_transaction_here(self) -> bool:
        """Whether the current task is inside this Store's `immediate()`."""
        return _transaction_owner.get() is self

    async def fetchval(self, sql: str, params: Sequence[Any] | dict = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    @asynccontextmanager
    async def immediate(self) -> AsyncIterator[Store]:
        """`BEGIN IMMEDIATE ... COMMIT`, or ROLLBACK when the block raises (or is cancelled).

        Takes SQLite's write lock at once, so read-then-write (claims, guarded transitions) cannot interleave with
        another writer. Re-entrant: a nested `immediate()` on the same Store joins the open transaction. Do not
        start tasks inside the block; they would share the transaction.
        """
        if _transaction_owner.get() is self:
            yield self
            return
        async with self._turn():
            try:
                await _to_the_end(self._conn.execute("BEGIN IMMEDIATE"))
            except BaseException:  # cancelled while waiting for the lock: the BEGIN may have happened meanwhile
                await _end_transaction(self._conn, "ROLLBACK")
                raise
            token = _transaction_owner.set(self)
            try:
                yield self
                await _to_the_end(self._conn.execute("COMMIT"))
            except BaseException:
                await _end_transaction(self._conn, "ROLLBACK")
                raise
            finally:
                _transaction_owner.reset(token)

    # --- read transactions (a second, read-only connection) -------------------------------------------------------

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Store | Reader]:
        """A read transaction: the block's statements all see the same committed state, and in WAL mode they neither
        take nor wait for the write lock, so a queue view never stalls behind (or stalls) a submission or a claim.

        Yields a `Reader` (fetchone, fetchall, fetchval, data_version). Inside this task's own `immediate()` it
        joins that transaction instead (yields the Store, so the block sees its uncommitted writes); a nested
        `read()` joins the open one. Do not start tasks inside the block.
        """
        if _transaction_owner.get() is self:
            yield self
            return
        current = _open_read.get()
        if current is not None and current.store is self:
            yield current
            return
        async with self._reader_lock:
            reader = self._reader or await self._open_reader()
            try:
                await _to_the_end(reader.conn.execute("BEGIN"))
                token = _open_read.set(reader)
                try:
                    yield reader
                finally:
                    _open_read.reset(token)
            finally:
                await _end_transaction(reader.conn, "COMMIT")  # nothing was written: this only ends the snapshot

    async def _open_reader(self) -> Reader:
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA query_only = ON")
            await conn.execute(f"PRAGMA busy_timeout = {int(READER_BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            await conn.close()
            raise
        self._reader = Reader(self, conn)
        return self._reader

    async def _close_reader(self) -> None:
        async with self._reader_lock:
            if self._reader is not None:
                await self._reader.conn.close()
                self._reader = None

    # --- migrations ---------------------------------------------------------------------------------------------

    async def _recorded(self) -> dict[int, str]:
        """The migrations the database recorded (version -> name); a plain read, no write lock."""
        if await self.fetchval("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"):
            return {row[0]: row[1] for row in await self.fetchall("SELECT version, name FROM schema_migrations")}
        return {}

    async def _pending(self, migrations: list[Migration]) -> list[Migration]:
        recorded = await self._recorded()
        for migration in migrations:
            if recorded.get(migration.version, migration.name) != migration.name:
                raise MigrationError(
                    f"database recorded migration {migration.version} as {recorded[migration.version]!r}, "
                    f"but the file is {migration.path.name}; migrations must never be renamed or replaced"
                )
        return [m for m in migrations if m.version not in recorded]

    async def _migrate(self, migrations: list[Migration], backups: Backups) -> None:
        """Apply what is pending, each migration in its own write transaction. Pending is decided again inside the
        lock, so two Stores opening a fresh file apply each migration once. A database that already had a schema
        is backed up first (under the lock: the backup is exactly what the migration starts from)."""
        backed_up = False
        for migration in migrations:
            statements = split_statements(migration.path.read_text(encoding="utf-8"))
            async with self.immediate():
                await self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
                )
                pending = await self._pending(migrations)
                if migration not in pending:
                    continue
                if not backed_up and len(pending) < len(migrations):
                    await backups.write(f"before-{migration.version:04d}")
                backed_up = True
                for statement in statements:
                    try:
                        await self._conn.execute(statement)
                    except sqlite3.Error as e:
                        raise MigrationError(
                            f"migration {migration.path.name} failed and was rolled back: {e}\n"
                            f"in: {statement[:200]}"
                        ) from e
                await self._conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )

    async def applied_migrations(self) -> list[tuple[int, str]]:
        rows = await self.fetchall("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(row["version"], row["name"]) for row in rows]
