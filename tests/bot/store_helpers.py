"""Shared by the Store start-up and backup tests: another process that holds the write lock, a damaged file."""
from __future__ import annotations

import asyncio
import sqlite3
import sys
from contextlib import asynccontextmanager, closing
from pathlib import Path

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class LockHolder:
    """A separate Python process holding `BEGIN IMMEDIATE` on a database until `release()`."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    async def release(self) -> None:
        if self.process.returncode is None:
            self.process.stdin.write(b"release\n")
            await self.process.stdin.drain()
            await asyncio.wait_for(self.process.wait(), timeout=30)


@asynccontextmanager
async def write_lock_held_by_another_process(path: Path):
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, str(path),
                                                   stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    holder = LockHolder(process)
    try:
        assert await asyncio.wait_for(process.stdout.readline(), timeout=30) == b"held\n"
        yield holder
    finally:
        await holder.release()


def add_jobs(path: Path, count: int) -> None:
    """Finished jobs with params of a realistic size, written straight to the file."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO jobs (kind, owner_id, guild_id, params, status, created_at) VALUES (?, ?, 1, ?, ?, ?)",
            (("imagine", 1000 + i % 7, '{"prompt": "%s"}' % ("a photo of sks dog " * 20), "succeeded", i)
             for i in range(count)))


def damage_the_middle(path: Path) -> None:
    """Overwrite three pages in the middle of the file: the header and the schema stay readable, so the file opens
    and its schema version reads fine; only reading every page finds the damage."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")  # fold the WAL back into the file
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    first = pages // 2
    data[first * page_size:(first + 3) * page_size] = bytes((i * 13) & 0xFF for i in range(3 * page_size))
    path.write_bytes(bytes(data))
