"""Setup problems a newcomer meets end `python -m bot` (run, run --no-discord) and `python -m bot check` with plain
lines that say what happened and what to do, never a traceback; `--debug` or BOOTHBOT_LOG_LEVEL=debug adds it.

Every situation runs the real entry point as a process; they all start at once (most of their time is spent
importing torch or waiting for a locked database), so the module costs about as much as its slowest case.
(Discord itself unreachable or refusing the token: tests/wire/test_discord_errors.py.)
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bot.store.backups import Backups
from bot.store.database import Store, find_migrations
from tests.bot.store_helpers import add_jobs, damage_the_middle

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"
RUN = ("run", "--no-discord")
CANNOT_START = "boothbot cannot start: "


@dataclass
class Case:
    args: tuple[str, ...]
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the key
    obey_permissions: bool = False  # run it where chmod applies, even as root


@dataclass
class Place:
    """The files the situations point at, made once for the module."""
    root: Path
    model: Path

    def __post_init__(self):
        self.missing_model = self.root / "models" / "sd15.safetensors"
        self.not_a_model = self.root / "not-a-model"
        self.not_a_model.mkdir()
        self.broken_checkpoint = self.root / "sd15-broken.safetensors"  # a saved error page instead of the download
        self.broken_checkpoint.write_text("<html><body>502 Bad Gateway</body></html>\n")
        self.data_file = self.root / "data-is-a-file"
        self.data_file.write_text("not a directory")
        self.read_only = self.root / "read-only-data"
        self.read_only.mkdir(mode=0o500)
        self.locked = self._bot_database("locked-data")  # nothing to migrate, another process holds the lock
        self.needs_migration = self.root / "needs-migration-data"  # a database from before migration 0001
        self.needs_migration.mkdir()
        with closing(sqlite3.connect(self.needs_migration / "boothbot.sqlite3")) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE older_schema (x)")
        self.damaged = self._bot_database("damaged-data")
        self.damaged_backup = Backups(self.damaged / "boothbot.sqlite3").write_now("daily").path
        _damage(self.damaged / "boothbot.sqlite3")
        self.damaged_inside = self._bot_database("damaged-inside-data")  # opens fine; quick_check finds it
        add_jobs(self.damaged_inside / "boothbot.sqlite3", 2000)
        damage_the_middle(self.damaged_inside / "boothbot.sqlite3")
        self.database_is_a_directory = self.root / "database-is-a-directory"
        (self.database_is_a_directory / "boothbot.sqlite3").mkdir(parents=True)
        self.not_a_database = self.root / "not-a-database"
        self.not_a_database.mkdir()
        (self.not_a_database / "boothbot.sqlite3").write_bytes(b"holiday photos, definitely not SQLite\n" * 200)

    def _bot_database(self, name: str) -> Path:
        directory = self.root / name

        async def create():
            await (await Store.open(directory / "boothbot.sqlite3")).close()

        asyncio.run(create())
        return directory


def _damage(path: Path) -> None:
    """Overwrite everything after the first page: the header still says SQLite, the tables are garbage."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = DELETE")  # fold the WAL back into the file
    conn.close()
    data = bytearray(path.read_bytes())
    data[4096:] = bytes((i * 7) & 0xFF for i in range(4096, len(data)))
    path.write_bytes(bytes(data))


def situations(place: Place, closed_port: int) -> dict[str, Case]:
    unreachable_hub = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",
                       "BOOTHBOT_MODEL": "someone/some-model"}
    return {
        "run-missing-model": Case(RUN, {"BOOTHBOT_MODEL": str(place.missing_model)}),
        "run-not-a-model": Case(RUN, {"BOOTHBOT_MODEL": str(place.not_a_model)}),
        "run-broken-checkpoint": Case(RUN, {"BOOTHBOT_MODEL": str(place.broken_checkpoint)}),
        "run-hub-offline": Case(RUN, {"BOOTHBOT_MODEL": "someone/some-model"}),
        "run-hub-unreachable": Case(RUN, unreachable_hub),
        "run-locked-database": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.needs_migration),
                                          "BOOTHBOT_DB_LOCK_WAIT_S": "3"}),
        "run-damaged-database": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.damaged)}),
        "run-not-a-database": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.not_a_database)}),
        "run-database-is-a-directory": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.database_is_a_directory)}),
        "run-data-dir-is-a-file": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.data_file)}),
        "run-read-only-data-dir": Case(RUN, {"BOOTHBOT_DATA_DIR": str(place.read_only)}, obey_permissions=True),
        # With Discord: the same checks come before any connection.
        "discord-missing-model": Case(("run",), {"BOOTHBOT_MODEL": str(place.missing_model)}),
        "discord-not-a-database": Case(("run",), {"BOOTHBOT_DATA_DIR": str(place.not_a_database)}),
        # `check` reports several findings in one run, so each run pairs two situations.
        "check-file-data-dir-not-a-model": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.data_file),
                                                             "BOOTHBOT_MODEL": str(place.not_a_model)}),
        "check-locked-broken-checkpoint": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.locked),
                                                            "BOOTHBOT_MODEL": str(place.broken_checkpoint)}),
        "check-not-a-database-hub-offline": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.not_a_database),
                                                              "BOOTHBOT_MODEL": "someone/some-model"}),
        "check-damaged-missing-model": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.damaged),
                                                         "BOOTHBOT_MODEL": str(place.missing_model)}),
        "check-damaged-inside": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.damaged_inside)}),
        "check-read-only-data-dir": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.read_only)},
                                         obey_permissions=True),
        "check-gpu-hub-unreachable": Case(("check", "--gpu"), unreachable_hub),
        # The traceback, on request.
        "debug-flag": Case((*RUN, "--debug"), {"BOOTHBOT_MODEL": str(place.missing_model)}),
        "debug-log-level": Case(("check",), {"BOOTHBOT_DATA_DIR": str(place.not_a_database),
                                             "BOOTHBOT_LOG_LEVEL": "debug"}),
    }


def bot_env(data_dir: Path, model: Path, overrides: dict[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BOOTHBOT_", "HF_")) and k != "DISCORD_TOKEN"}
    env.update({"DISCORD_TOKEN": TOKEN, "BOOTHBOT_DATA_DIR": str(data_dir), "BOOTHBOT_MODEL": str(model),
                "BOOTHBOT_DEVICE": "cpu", "BOOTHBOT_DTYPE": "fp32", "HF_HOME": str(data_dir.parent / "hf-home"),
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir, closed_port, obey_permissions) -> dict[str, subprocess.CompletedProcess]:
    place = Place(tmp_path_factory.mktemp("places"), tiny_model_dir)
    holders = [sqlite3.connect(directory / "boothbot.sqlite3", isolation_level=None)
               for directory in (place.locked, place.needs_migration)]
    for holder in holders:  # another process holds the bot's database
        holder.execute("BEGIN EXCLUSIVE")
    running = {}
    try:
        for name, case in situations(place, closed_port).items():
            if case.obey_permissions and obey_permissions is None:
                continue
            home = tmp_path_factory.mktemp(name)
            command = [sys.executable, "-m", "bot", *case.args, "--env-file", str(home / "no.env")]
            running[name] = subprocess.Popen(
                command, cwd=REPO_ROOT, env=bot_env(home / "data", tiny_model_dir, case.env),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=obey_permissions if case.obey_permissions else None)
        done = {}
        for name, proc in running.items():
            output, _ = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, output)
    finally:
        for holder in holders:
            holder.rollback()
            holder.close()
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
        place.read_only.chmod(0o700)
    return done | {"place": place}


def outcome(outcomes, name: str) -> subprocess.CompletedProcess:
    if name not in outcomes:
        pytest.skip("this machine cannot run a process that obeys file permissions")
    return outcomes[name]


def plain_stop(outcomes, name: str, *message: str) -> str:
    """The run stopped with exit 2, no traceback, and its last line is the plain message with every given part."""
    done = outcome(outcomes, name)
    assert "Traceback" not in done.stdout, done.stdout
    assert done.returncode == 2, done.stdout
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith(CANNOT_START), done.stdout
    for part in message:
        assert part in last, f"{part!r} not in {last!r}"
    return last


def check_failed(outcomes, name: str, topic: str, *message: str) -> str:
    """`check` exited 1 with no traceback, and its FAIL line for `topic` has every given part."""
    done = outcome(outcomes, name)
    assert "Traceback" not in done.stdout, done.stdout
    assert done.returncode == 1, done.stdout
    lines = [line for line in done.stdout.splitlines() if line.split()[:2] == ["FAIL", topic]]
    assert lines, f"no FAIL {topic} line in:\n{done.stdout}"
    for part in message:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"
    return lines[-1]


# --- the base model ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run-missing-model", "discord-missing-model"])
def test_missing_model_path(outcomes, name):
    missing = outcomes["place"].missing_model
    plain_stop(outcomes, name, f"{missing} does not exist: give a hub id such as",
               "a local diffusers directory, or a .safetensors/.ckpt file")


def test_directory_that_is_not_a_model(outcomes):
    place = outcomes["place"]
    plain_stop(outcomes, "run-not-a-model", f"{place.not_a_model} is a directory but has no model_index.json",
               "save one with pipe.save_pretrained")
    check_failed(outcomes, "check-file-data-dir-not-a-model", "model", "has no model_index.json")


def test_checkpoint_that_is_not_a_safetensors_file(outcomes):
    broken = outcomes["place"].broken_checkpoint
    plain_stop(outcomes, "run-broken-checkpoint", f"{broken} is not a readable .safetensors file",
               "download it again, or point BOOTHBOT_MODEL")
    check_failed(outcomes, "check-locked-broken-checkpoint", "model", "is not a readable .safetensors file")


def test_hub_model_not_downloaded_while_offline(outcomes):
    plain_stop(outcomes, "run-hub-offline", "someone/some-model is not in the local Hugging Face cache",
               "HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE for the first start, or point BOOTHBOT_MODEL")
    check_failed(outcomes, "check-not-a-database-hub-offline", "model", "HF_HUB_OFFLINE is set")


def test_hub_model_not_downloaded_and_the_hub_refuses_the_connection(outcomes, closed_port):
    # The GPU worker finds out: its `fatal` is logged as one line and stops the bot (the traceback is debug only).
    last = plain_stop(outcomes, "run-hub-unreachable", "someone/some-model is not in the local Hugging Face cache",
                      f"the hub at http://127.0.0.1:{closed_port} cannot be reached",
                      "check this machine's internet connection")
    output = outcomes["run-hub-unreachable"].stdout
    assert f"ERROR   boothbot.worker: the GPU worker cannot start: {last.removeprefix(CANNOT_START)}" in output
    assert "worker was killed" not in output  # it exits by itself after telling why
    check_failed(outcomes, "check-gpu-hub-unreachable", "worker",
                 "the GPU worker could not start: the base model someone/some-model is not in the local",
                 "check this machine's internet connection")


# --- the database ------------------------------------------------------------------------------------------------

def test_database_with_a_pending_migration_locked_by_another_process(outcomes):
    db = outcomes["place"].needs_migration / "boothbot.sqlite3"
    plain_stop(outcomes, "run-locked-database",
               f"the database {db} is in use by another process (still locked after 3 s)",
               "stop the other program using it", "or set BOOTHBOT_DATA_DIR to another directory")
    assert (f"the database {db} is locked by another process (another boothbot with the same BOOTHBOT_DATA_DIR, or "
            "a database tool such as sqlite3 or DB Browser with an open transaction); waiting up to 3 s for it to "
            "apply 0001_initial.sql") in outcomes["run-locked-database"].stdout


def test_database_with_nothing_to_migrate_starts_while_another_process_holds_its_lock(outcomes):
    db = outcomes["place"].locked / "boothbot.sqlite3"
    done = outcome(outcomes, "check-locked-broken-checkpoint")
    (line,) = [line for line in done.stdout.splitlines() if line.split()[:2] == ["ok", "database"]]
    assert f"{db}: {len(find_migrations())} migration(s)" in line
    check_failed(outcomes, "check-locked-broken-checkpoint", "model", "is not a readable .safetensors file")


def test_damaged_database(outcomes):
    place = outcomes["place"]
    db = place.damaged / "boothbot.sqlite3"
    plain_stop(outcomes, "run-damaged-database", f"the database {db} is damaged (database disk image is malformed)",
               f"the newest backup is {place.damaged_backup}", f"then cp {place.damaged_backup} {db}")
    check_failed(outcomes, "check-damaged-missing-model", "database", f"{db} is damaged")
    check_failed(outcomes, "check-damaged-missing-model", "model", "does not exist")


def test_database_damaged_inside_is_found_at_start(outcomes):
    db = outcomes["place"].damaged_inside / "boothbot.sqlite3"
    check_failed(outcomes, "check-damaged-inside", "database", f"the database {db} is damaged (",
                 f"there is no backup in {db.parent / 'backups'}")


def test_directory_in_place_of_the_database_file(outcomes):
    db = outcomes["place"].database_is_a_directory / "boothbot.sqlite3"
    plain_stop(outcomes, "run-database-is-a-directory", f"{db} is a directory, not the database file")


@pytest.mark.parametrize("name", ["run-not-a-database", "discord-not-a-database"])
def test_file_that_is_not_a_database(outcomes, name):
    db = outcomes["place"].not_a_database / "boothbot.sqlite3"
    plain_stop(outcomes, name, f"{db} is not a SQLite database (file is not a database): move that file away")
    if name == "run-not-a-database":
        check_failed(outcomes, "check-not-a-database-hub-offline", "database", f"{db} is not a SQLite database")


# --- the data directory ------------------------------------------------------------------------------------------

def test_data_directory_that_is_a_file(outcomes):
    data = outcomes["place"].data_file
    plain_stop(outcomes, "run-data-dir-is-a-file", f"BOOTHBOT_DATA_DIR: {data} is a file, not a directory",
               "set BOOTHBOT_DATA_DIR to a directory")
    check_failed(outcomes, "check-file-data-dir-not-a-model", "data", f"{data} is a file, not a directory")
    assert "database" not in outcomes["check-file-data-dir-not-a-model"].stdout  # not tried without a directory


def test_data_directory_that_is_not_writable(outcomes):
    data = outcomes["place"].read_only
    plain_stop(outcomes, "run-read-only-data-dir", f"BOOTHBOT_DATA_DIR: cannot write in {data} (Permission denied)",
               "set BOOTHBOT_DATA_DIR to a directory this user can write in")
    check_failed(outcomes, "check-read-only-data-dir", "data", f"cannot write in {data} (Permission denied)")


# --- the traceback on request ------------------------------------------------------------------------------------

def test_debug_flag_shows_the_traceback_before_the_plain_line(outcomes):
    done = outcomes["debug-flag"]
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stdout and "ModelNotFound" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith(CANNOT_START)


def test_debug_log_level_shows_the_traceback_in_check(outcomes):
    done = outcomes["debug-log-level"]
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stdout and "file is not a database" in done.stdout


def test_discord_reconnect_tracebacks_become_one_line_unless_debugging():
    import io
    import logging

    from bot.logs import setup_logging

    root_level = logging.getLogger().level
    for level, with_traceback in (("INFO", False), ("DEBUG", True)):
        stream = io.StringIO()
        handler = setup_logging(level, stream=stream)
        try:
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except OSError:
                logging.getLogger("discord.client").exception("Attempting a reconnect in %.2fs", 1.52)
        finally:
            logging.getLogger().removeHandler(handler)
            logging.getLogger().setLevel(root_level)
            logging.captureWarnings(False)
        text = stream.getvalue()
        assert ("Traceback" in text) is with_traceback, text
        if not with_traceback:
            assert text.strip().endswith("WARNING discord.client: no connection to Discord (ConnectionRefusedError: "
                                         "[Errno 111] Connect call failed); trying again in 1.5 s")
