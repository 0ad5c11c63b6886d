"""Photo intake for /train, run in a child process (`python -m trainer.intake`) under an address-space limit.

Decoding a member's upload is the one thing the bot does with data a stranger made; however an upload was built
(a decompression bomb, a 16-bit giant, a zip whose records lie), its memory is the child's and goes away with it.
Uploads travel as files: the cog streams each attachment into a work directory in the data directory
(`intake_workspace`), the child reads them there and leaves the accepted photos, its report and the thumbnails
beside them; the bot reads back only the report (a few KB) and the thumbnails. A child that runs out of memory,
dies or takes too long becomes a UserError for the member; the bot carries on.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bot.errors import UserError
from trainer.intake import isolated
from trainer.intake.address_space import QUIET_THREADS
from trainer.intake.photos import IntakeLimits, IntakeReport

log = logging.getLogger(__name__)

MEMORY_MB = 1024  # the child's address space: ~150 MB for Python and the libraries, a photo at most 128 MB decoded
TIMEOUT_S = 300.0
AT_ONCE = 2  # intake children running at the same time (each may use MEMORY_MB)
WORKSPACES = "intake"  # under the data directory
STALE_AFTER_S = 24 * 3600.0  # work directories left by a killed bot are removed after this
TOO_LARGE = ("One of your photos is too large to process (it needs more memory than this bot allows for a photo). "
             "Please send smaller photos, e.g. ordinary JPEGs from your phone.")

CHILD = ("-m", "trainer.intake")  # run with this Python, the request file's path after it
REPO_ROOT = Path(__file__).resolve().parents[2]  # `-m trainer.intake` is found from here, installed or not
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def intake_workspace(data_dir: Path) -> AsyncIterator[Path]:
    """A fresh directory under data_dir/intake/, removed with everything in it when the block ends."""
    root = Path(data_dir) / WORKSPACES
    await asyncio.to_thread(_remove_stale, root)
    work = root / secrets.token_hex(8)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def take_in_photos(files: Sequence[tuple[str, bytes | Path]], work_dir: Path, *, limits: IntakeLimits,
                         class_name: str, style: bool, memory_mb: int = MEMORY_MB,
                         timeout_s: float = TIMEOUT_S) -> IntakeReport:
    """Run the intake of `files` ((name, bytes) or (name, path of a saved upload)) in a child process.

    Returns its report, whose accepted photos are saved in `work_dir` (`report.save` copies them where they
    belong) and whose `contact_sheet` holds the thumbnails. Raises UserError when the child fails.
    """
    inputs = []
    for number, (name, content) in enumerate(files):
        if not isinstance(content, (str, os.PathLike)):
            path = work_dir / f"upload-{number:02d}"
            await asyncio.to_thread(path.write_bytes, content)
            content = path
        inputs.append((name, Path(content).resolve()))
    request = isolated.write_request(work_dir, inputs, limits=dataclasses.asdict(limits), class_name=class_name,
                                     style=style, memory_mb=memory_mb)
    async with _slot():
        started = time.monotonic()
        status = await _run_child(request, timeout_s)
    log.info("photo intake of %d file(s) took %.1f s (exit status %s)", len(inputs), time.monotonic() - started,
             status)
    report_path = work_dir / isolated.REPORT
    if status != 0 or not report_path.exists():
        raise _failure(status, work_dir)
    report = IntakeReport.from_dict(json.loads(report_path.read_text()), limits, work_dir / isolated.PHOTOS)
    sheet = work_dir / isolated.CONTACT_SHEET
    report.contact_sheet = sheet.read_bytes() if sheet.exists() else None
    return report


async def _run_child(request: Path, timeout_s: float) -> int | None:
    """The child's exit status (negative: killed by that signal), or None when it ran out of time."""
    with open(request.parent / "stderr.txt", "wb") as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable, *CHILD, str(request), stdin=asyncio.subprocess.DEVNULL,
            stdout=stderr, stderr=stderr, env={**os.environ, **QUIET_THREADS}, cwd=REPO_ROOT,
            start_new_session=True)  # like the GPU worker: Ctrl-C reaches the bot, which ends the child itself
        try:
            return await asyncio.wait_for(child.wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            if child.returncode is None:  # timed out, or the submission was cancelled
                child.kill()
                await child.wait()


def _failure(status: int | None, work_dir: Path) -> UserError:
    if status is None:
        log.warning("photo intake ran out of time in %s", work_dir)
        return UserError("Your photos took too long to process. Please send fewer or smaller photos "
                         "(ordinary JPEGs work best).")
    errors = (work_dir / "stderr.txt").read_text(errors="replace")[-4000:]
    if status == isolated.CANNOT_START:
        log.error("photo intake cannot start: %s", errors.strip())
        return UserError("Photos can't be processed on this bot right now; the problem has been logged for its "
                         "operator. Please try again later.")
    # Killed by a signal, or an allocation refused under the limit (Python's MemoryError, or a library's own words)
    out_of_memory = (status == isolated.OUT_OF_MEMORY or status < 0
                     or any(words in errors.lower() for words in ("memoryerror", "memory allocation", "out of memory",
                                                                  "cannot allocate memory")))
    log.warning("photo intake failed (exit status %s%s):\n%s", status, ", out of memory" if out_of_memory else "",
                errors)
    if out_of_memory:
        return UserError(TOO_LARGE)
    return UserError("Something went wrong while reading your photos (it has been logged). Please try again, or "
                     "send them as ordinary JPEGs.")


def _slot() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = asyncio.Semaphore(AT_ONCE)
    return _slots[loop]


def _remove_stale(root: Path) -> None:
    if not root.is_dir():
        return
    for work in root.iterdir():
        with contextlib.suppress(OSError):
            if time.time() - work.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(work, ignore_errors=True)
