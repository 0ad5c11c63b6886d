"""Store: pragmas, numbered migrations (recorded, idempotent, all-or-nothing), transactions on one connection."""
from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import sys

import pytest

from bot.store.database import MIGRATIONS_DIR, MigrationError, Store, find_migrations, split_statements


async def test_open_sets_wal_foreign_keys_and_records_migrations(tmp_path):
    async with await Store.open(tmp_path / "db" / "boothbot.sqlite3") as store:
        assert await store.fetchval("PRAGMA journal_mode") == "wal"
        assert await store.fetchval("PRAGMA foreign_keys") == 1
        assert await store.fetchval("PRAGMA busy_timeout") >= 1000
        applied = await store.applied_migrations()
        assert applied == [(m.version, m.name) for m in find_migrations()]
        assert applied[0] == (1, "0001_initial")
        tables = {row[0] for row in await store.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"members", "concepts", "jobs", "images", "bans", "limits", "settings_kv", "audit_log",
                "schema_migrations"} <= tables


async def test_reopen_applies_nothing_twice_and_keeps_data(tmp_path):
    path = tmp_path / "b.sqlite3"
    async with await Store.open(path) as store:
        await store.execute("INSERT INTO settings_kv (key, value, updated_at) VALUES ('x', '1', 0)")
        first = await store.fetchall("SELECT version, applied_at FROM schema_migrations")
    async with await Store.open(path) as store:
        again = await store.fetchall("SELECT version, applied_at FROM schema_migrations")
        assert [tuple(r) for r in again] == [tuple(r) for r in first]
        assert await store.fetchval("SELECT value FROM settings_kv WHERE key = 'x'") == "1"


async def test_two_stores_opening_a_fresh_file_at_once_migrate_once(tmp_path):
    path = tmp_path / "race.sqlite3"
    stores = await asyncio.gather(*(Store.open(path) for _ in range(4)))
    try:
        assert await stores[0].fetchval("SELECT COUNT(*) FROM schema_migrations") == len(find_migrations())
    finally:
        for store in stores:
            await store.close()


async def test_a_failing_migration_leaves_nothing_half_applied(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_initial.sql", migrations)
    (migrations / "0002_broken.sql").write_text(
        "CREATE TABLE half (a INTEGER);\nINSERT INTO half VALUES (1);\nINSERT INTO no_such_table VALUES (1);\n")
    path = tmp_path / "m.sqlite3"
    with pytest.raises(MigrationError, match="0002_broken.sql failed and was rolled back"):
        await Store.open(path, migrations_dir=migrations)
    async with await Store.open(path) as store:  # the real migrations: 0001 stayed, 0002 left no trace
        applied = await store.applied_migrations()
        assert applied[0] == (1, "0001_initial") and "0002_broken" not in {name for _, name in applied}
        assert await store.fetchval("SELECT name FROM sqlite_master WHERE name = 'half'") is None


async def test_misnamed_or_renamed_migrations_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "2_thing.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_lowercase_name.sql"):
        find_migrations(bad)

    path = tmp_path / "r.sqlite3"
    await (await Store.open(path)).close()
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_initial.sql", renamed / "0001_other.sql")
    with pytest.raises(MigrationError, match="must never be renamed"):
        await Store.open(path, migrations_dir=renamed)


def test_split_statements_keeps_trigger_bodies_and_quoted_semicolons_whole():
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (a TEXT);
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;y'; SELECT 1; END;
    INSERT INTO t VALUES ('1;2'); INSERT INTO t VALUES ('3');
    """
    statements = split_statements(script)
    assert len(statements) == 4
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(MigrationError, match="unterminated"):
        split_statements("CREATE TABLE t (a TEXT)")


async def test_immediate_rolls_back_on_error_and_nests(store):
    with pytest.raises(RuntimeError):
        async with store.immediate() as db:
            await db.execute("INSERT INTO settings_kv (key, value, updated_at) VALUES ('a', '1', 0)")
            async with store.immediate():  # joins the open transaction
                await db.execute("INSERT INTO settings_kv (key, value, updated_at) VALUES ('b', '1', 0)")
            raise RuntimeError("boom")
    assert await store.fetchval("SELECT COUNT(*) FROM settings_kv") == 0


async def test_other_coroutines_never_slip_into_an_open_transaction(store):
    """One connection, two coroutines: B's write must not be rolled back with A's transaction."""
    entered = asyncio.Event()

    async def a():
        with pytest.raises(RuntimeError):
            async with store.immediate() as db:
                await db.execute("INSERT INTO settings_kv (key, value, updated_at) VALUES ('a', '1', 0)")
                entered.set()
                await asyncio.sleep(0.05)
                raise RuntimeError("roll back A")

    async def b():
        await entered.wait()
        await store.execute("INSERT INTO settings_kv (key, value, updated_at) VALUES ('b', '1', 0)")

    await asyncio.gather(a(), b())
    assert [r[0] for r in await store.fetchall("SELECT key FROM settings_kv")] == ["b"]


async def test_foreign_keys_are_enforced(store):
    with pytest.raises(sqlite3.IntegrityError):
        await store.execute("INSERT INTO images (job_id, owner_id, guild_id, path, created_at)"
                            " VALUES (999, 1, 1, 'x.png', 0)")


CHILD = r"""
import asyncio, sys
from bot.jobs.ledger import Ledger
from bot.store.database import Store

async def main(path):
    store = await Store.open(path)
    ledger = Ledger(store)
    job = await ledger.submit("imagine", 1, 1, 1, {})
    await ledger.claim(job.id)
    async with store.immediate() as db:  # a finish that never commits
        await db.execute("UPDATE jobs SET status = 'succeeded', finished_at = 1 WHERE id = ?", (job.id,))
        print(job.id, flush=True)
        await asyncio.sleep(60)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_process_killed_inside_a_transaction_leaves_the_last_committed_state(tmp_path):
    from bot.jobs.ledger import Ledger

    path = tmp_path / "killed.sqlite3"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE, cwd=str(MIGRATIONS_DIR.parent.parent))
    try:
        job_id = int(await asyncio.wait_for(child.stdout.readline(), timeout=30))
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()

    async with await Store.open(path, busy_timeout_s=5) as store:
        ledger = Ledger(store)
        assert (await ledger.get(job_id)).status == "running"  # the uncommitted finish is gone
        (recovered,) = await ledger.recover_at_start()  # and the dead process's write lock with it
        assert (recovered.id, recovered.status) == (job_id, "interrupted")
