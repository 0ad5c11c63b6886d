"""Online backups (bot/store/backups.py): a checked copy with the same rows, before a migration, on a daily
schedule driven by an injected clock, the newest `keep` kept."""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from contextlib import closing

import pytest

from bot.store.backups import DAY_S, Backups, BackupSchedule
from bot.store.database import MIGRATIONS_DIR, Store
from tests.bot.store_helpers import add_jobs


def rows(path, sql="SELECT * FROM jobs ORDER BY id"):
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
async def db(tmp_path):
    path = tmp_path / "data" / "boothbot.sqlite3"
    await (await Store.open(path)).close()
    add_jobs(path, 50)
    return path


async def test_a_backup_is_a_checked_database_with_the_same_rows_written_while_the_store_is_open(db, caplog):
    caplog.set_level(logging.INFO, logger="boothbot.backups")
    async with await Store.open(db) as store:
        await store.execute("UPDATE jobs SET delivered_at = 123 WHERE id = 3")
        backup = await Backups(db).write("daily")
        assert rows(backup.path) == rows(db)
    assert backup.path.parent == db.parent / "backups"
    assert backup.path.name.startswith("boothbot-") and backup.path.name.endswith("-daily.sqlite3")
    assert rows(backup.path, "PRAGMA quick_check") == [("ok",)]
    assert rows(backup.path, "PRAGMA journal_mode") == [("delete",)]  # one file, nothing beside it needed
    assert sorted(p.name for p in backup.path.parent.iterdir()) == [backup.path.name]  # no temporary left
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"database backup written: {backup.path.resolve()} (") and "checked" in line


async def test_a_migration_is_preceded_by_a_backup_of_the_database_it_starts_from(db, tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for real in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(real, migrations)
    (migrations / "0999_notes.sql").write_text("CREATE TABLE notes (id INTEGER PRIMARY KEY);\n")
    before = rows(db)
    async with await Store.open(db, migrations_dir=migrations) as store:
        assert (await store.applied_migrations())[-1] == (999, "0999_notes")
    (backup,) = Backups(db).all()
    assert backup.reason == "before-0999"
    assert rows(backup.path) == before
    assert rows(backup.path, "SELECT name FROM sqlite_master WHERE name = 'notes'") == []
    async with await Store.open(db, migrations_dir=migrations):  # nothing pending: no new backup
        pass
    assert len(Backups(db).all()) == 1


async def test_a_new_database_is_not_backed_up(tmp_path):
    path = tmp_path / "new" / "boothbot.sqlite3"
    await (await Store.open(path)).close()
    assert Backups(path).all() == []


class Stop(Exception):
    pass


async def test_the_schedule_backs_up_at_start_then_daily_keeping_the_newest(db, clock):
    slept = []

    async def sleep(seconds):
        slept.append(seconds)
        if len(slept) == 4:
            raise Stop
        clock.advance(seconds)

    backups = Backups(db, keep=2, clock=clock)
    schedule = BackupSchedule(backups, interval_s=DAY_S, clock=clock, sleep=sleep)
    with pytest.raises(Stop):
        await schedule.run()
    assert slept == [DAY_S] * 4  # no backup yet: one at once, then one a day
    kept = backups.all()
    assert [b.written_at for b in kept] == [clock.now, clock.now - DAY_S]  # 4 written, the newest 2 kept
    assert [b.reason for b in kept] == ["daily", "daily"]


async def test_the_schedule_waits_out_a_recent_backup_at_start(db, clock):
    backups = Backups(db, clock=clock)
    backups.write_now("before-0999")
    clock.advance(2 * 3600)
    slept = []

    async def sleep(seconds):
        slept.append(seconds)
        raise Stop

    with pytest.raises(Stop):
        await BackupSchedule(backups, clock=clock, sleep=sleep).run()
    assert slept == [DAY_S - 2 * 3600] and len(backups.all()) == 1


async def test_rotation_leaves_other_files_alone(db, clock):
    backups = Backups(db, keep=1, clock=clock)
    backups.directory.mkdir()
    mine = backups.directory / "my-copy.sqlite3"
    mine.write_bytes(b"operator's file")
    for _ in range(3):
        backups.write_now("daily")
        clock.advance(60)
    assert len(backups.all()) == 1 and mine.read_bytes() == b"operator's file"


async def test_a_copy_cut_short_leaves_no_temporary_file_for_long(db):
    backups = Backups(db)
    backups.directory.mkdir()
    killed = backups.directory / ".boothbot-20261201T031500Z-daily.sqlite3.4242.1.tmp"  # the bot was killed mid-copy
    killed.write_bytes(b"half a database")
    os.utime(killed, (time.time() - 2 * 3600,) * 2)
    recent = backups.directory / ".boothbot-20261201T031500Z-daily.sqlite3.4343.1.tmp"  # another process, copying
    recent.write_bytes(b"a copy under way")
    backups.write_now("daily")
    assert not killed.exists() and recent.exists()
