"""The bot as a process of its own (bench/wire/live_bot.py) and its GPU worker, found in the bot's process tree."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from bench.wire import live_bot
from bench.wire.fake_discord import FakeDiscord


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc; every thread lists the children it forked)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def is_worker(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"trainer\0worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


class BotProcess:
    """`python -m bot run` against the fake Discord, its output appended to `log_path`; restartable."""

    def __init__(self, fake: FakeDiscord, env: dict[str, str], *, env_file: Path, log_path: Path, setup: str = ""):
        self.fake = fake
        self.env = env
        self.env_file = env_file
        self.log_path = log_path
        self.setup = setup
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def worker_pid(self) -> int | None:
        pid = self.pid
        return next((child for child in children(pid) if is_worker(child)), None) if pid else None

    async def start(self, timeout: float = 180.0) -> None:
        """Start the bot and wait until it is connected to the fake's gateway."""
        await self.fake.wait_for(lambda: not self.fake._ws, 30, "the previous bot's gateway connection to close")
        with self.log_path.open("ab") as log:
            log.write(f"\n----- start {self.starts + 1} -----\n".encode())
            log.flush()
            self.proc = await live_bot.start_bot(self.fake.api_base, self.fake.gateway_url, self.env,
                                                 env_file=self.env_file, stdout=log, setup=self.setup)
        self.starts += 1
        connected = asyncio.create_task(self.fake.wait_connected(timeout))
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
        for task in (connected, exited):
            task.cancel()
        if self.proc.returncode is not None:
            raise RuntimeError(f"the bot exited with code {self.proc.returncode} at start; see {self.log_path}")
        await connected  # raises AssertionError when it timed out

    async def wait_worker(self, *, other_than: int | None = None, timeout: float = 120.0) -> int | None:
        """The pid of the bot's worker, waiting until there is one (and not `other_than`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid is not None:
            pid = self.worker_pid()
            if pid is not None and pid != other_than:
                return pid
            await asyncio.sleep(0.2)
        return None

    async def kill(self) -> int | None:
        """kill -9 the bot; returns the pid of the worker it leaves behind (it should exit on its own)."""
        worker = self.worker_pid()
        os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        return worker

    async def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM (the bot's clean shutdown), kill -9 after `timeout`; returns the exit code."""
        if self.pid is None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        return self.proc.returncode


async def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until the process has exited; False when it still runs after `timeout`."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True
