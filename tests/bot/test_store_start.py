"""Store start-up against what operators do to the file: another process writing or holding the write lock, a
pending migration behind that lock, a damaged file. (The same through the real `python -m bot` process:
tests/bot/test_setup_errors.py.)"""
from __future__ import annotations

import asyncio
import logging
import shutil

import pytest

from bot.errors import SetupError
from bot.store.backups import Backups
from bot.store.database import MIGRATIONS_DIR, Store
from tests.bot.store_helpers import add_jobs, damage_the_middle, write_lock_held_by_another_process


@pytest.fixture
def db(tmp_path):
    return tmp_path / "data" / "boothbot.sqlite3"


@pytest.fixture
def with_a_new_migration(tmp_path):
    """The real migrations plus one more, as after an upgrade of the bot."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    for real in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(real, directory)
    (directory / "0999_notes.sql").write_text("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);\n")
    return directory


async def test_start_with_nothing_to_migrate_takes_no_write_lock(db):
    await (await Store.open(db)).close()
    add_jobs(db, 3)
    async with write_lock_held_by_another_process(db):
        async with await Store.open(db, lock_wait_s=2) as store:  # main: BEGIN IMMEDIATE per migration -> locked
            assert await store.fetchval("SELECT COUNT(*) FROM jobs") == 3
            assert await store.fetchval("PRAGMA journal_mode") == "wal"


async def test_a_pending_migration_waits_for_the_lock_says_so_and_then_applies(db, with_a_new_migration, caplog):
    await (await Store.open(db)).close()
    add_jobs(db, 3)
    caplog.set_level(logging.WARNING, logger="boothbot.store")
    async with write_lock_held_by_another_process(db) as holder:
        opening = asyncio.create_task(Store.open(db, migrations_dir=with_a_new_migration, lock_wait_s=120))
        for _ in range(600):  # the log line comes after the first second of waiting
            if "is locked by another process" in caplog.text or opening.done():
                break
            await asyncio.sleep(0.05)
        assert not opening.done()
        (line,) = [r.getMessage() for r in caplog.records if "is locked by another process" in r.getMessage()]
        assert str(db.resolve()) in line
        assert "another boothbot with the same BOOTHBOT_DATA_DIR, or a database tool" in line
        assert "waiting up to 2 min for it to apply 0999_notes.sql" in line
        await holder.release()
        store = await asyncio.wait_for(opening, timeout=60)
    async with store:
        assert (await store.applied_migrations())[-1] == (999, "0999_notes")
        assert await store.fetchval("SELECT COUNT(*) FROM notes") == 0


async def test_a_lock_held_past_the_wait_gives_up_with_the_setup_error(db, with_a_new_migration):
    await (await Store.open(db)).close()
    async with write_lock_held_by_another_process(db):
        with pytest.raises(SetupError, match="is in use by another process \\(still locked after 2 s\\)"):
            await Store.open(db, migrations_dir=with_a_new_migration, lock_wait_s=2)


async def test_a_damaged_database_is_refused_naming_the_file_and_the_newest_backup(db, clock):
    await (await Store.open(db)).close()
    add_jobs(db, 2000)
    backups = Backups(db, clock=clock)
    backups.write_now("daily")
    clock.advance(3600)
    newest = backups.write_now("daily")
    clock.advance(2 * 3600)
    damage_the_middle(db)
    with pytest.raises(SetupError) as refused:  # main: opens, and some later query fails with a traceback
        await Store.open(db, backups=backups)
    message = str(refused.value)
    assert message.startswith(f"the database {db.resolve()} is damaged (")
    assert f"the newest backup is {newest.path.resolve()} (2 h old)" in message
    assert f"then cp {newest.path.resolve()} {db.resolve()}" in message
    assert "\n" not in message


async def test_a_damaged_database_without_a_backup_says_there_is_none(db):
    await (await Store.open(db)).close()
    add_jobs(db, 2000)
    damage_the_middle(db)
    with pytest.raises(SetupError, match=f"and there is no backup in {db.parent.resolve() / 'backups'}: move "):
        await Store.open(db)


async def test_a_directory_in_place_of_the_database_file_is_named(db):
    db.mkdir(parents=True)
    with pytest.raises(SetupError, match=f"{db.resolve()} is a directory, not the database file"):
        await Store.open(db)
