"""Errors the engines raise on purpose; anything else is a bug and is reported with a traceback."""
from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path


class UserError(ValueError):
    """A mistake the member can fix (bad photo set, unknown token, option out of range). str() is shown to them."""


class Cancelled(Exception):
    """The job was cancelled; raised at a step boundary."""


class SetupError(Exception):
    """Something about this machine stops the program: the base model, the data directory, the database, the network,
    Discord. str() is the whole story for the operator: what happened and what to do, in a line or two.

    Each entry point (`python -m bot`, `python -m bot check`, `python -m trainer`) prints it without a traceback;
    `--debug` (or BOOTHBOT_LOG_LEVEL=debug) shows the traceback too.
    """


def print_setup_error(error: BaseException, *, prefix: str, debug: bool, stream=None) -> None:
    """The plain message on stderr; with `debug` the traceback first, so the message stays the last line."""
    stream = stream or sys.stderr
    if debug:
        traceback.print_exception(error, file=stream)
    print(f"{prefix}{error}", file=stream, flush=True)


def require_writable_dir(path: str | Path, setting: str) -> Path:
    """Create the directory `path` if needed and check that this user can write in it; returns it resolved.

    `setting` names what chose the directory (BOOTHBOT_DATA_DIR, --out), so the message says what to change.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise SetupError(f"{setting}: {path} is a file, not a directory; set {setting} to a directory "
                         "(it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise SetupError(f"{setting}: cannot write in {path} ({e.strerror or e}); set {setting} to a directory "
                         "this user can write in, or fix its permissions") from e
    return path
