"""The real bot as its own process (bench/wire/live_bot.py) with its GPU worker, driven through the wire-level fake
Discord the way members use it. Every figure is timed from the moment a command is sent to what the member sees:
the result post of an /imagine, the "`token` is ready" post of a /train."""
from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.burst import QUEUED, TimedDiscord, result_job_ids
from bench.wire import live_bot
from bench.wire.fake_discord import FakeMember

READY_LINE = "GPU worker ready"  # bot/dispatch/worker_client.py logs it when the worker has loaded the model
FAILED = re.compile(r"your \w+ job (\d+) failed: (.*)")  # cogs/_render.py's failure text
STOP_TIMEOUT_S = 60.0
# trainer/generation/aot_kernels.py's lines in the worker's log (the bot logs the worker's stderr)
COMPILING = re.compile(r"compiling the UNet forward for (\d+) shape")
COMPILED_IN_USE = "compiled UNet forward in use for"
COMPILED_REFUSED = re.compile(r"compiled UNet forward \w+ not used:")


def compiled_ahead_counts(log: str) -> dict:
    """How many forward shapes the worker asked to compile ahead of time, has in use and refused, from its log."""
    return {"requested": sum(int(n) for n in COMPILING.findall(log)), "in_use": log.count(COMPILED_IN_USE),
            "refused": len(COMPILED_REFUSED.findall(log))}


class BenchFailed(RuntimeError):
    """The bot did not do what a member asked (the message says what and shows the bot's log tail)."""


class ServingDiscord(TimedDiscord):
    """The fake Discord, also noting when each channel message was posted and when each job's result was."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[float, dict]] = []  # (monotonic time, body) of every message posted in the channel
        self.result_at: dict[int, float] = {}  # job id -> when its result (the post with its buttons) was posted

    def _channel_message(self, method, channel_id, rest, body, files):
        response = super()._channel_message(method, channel_id, rest, body, files)
        if not rest and method == "POST" and channel_id == self.channel_id:
            at = time.monotonic()
            self.posts.append((at, body or {}))
            for job_id in result_job_ids(body or {}):
                self.result_at.setdefault(job_id, at)
        return response

    def posted(self, containing: str, since: float) -> float | None:
        """When the first channel message containing `containing` was posted at or after `since`."""
        return next((at for at, body in self.posts if at >= since and containing in (body.get("content") or "")),
                    None)

    def failure(self, job_id: int) -> str | None:
        """The reason the bot gave in the channel for the job's failure, if it failed."""
        for _, body in self.posts:
            match = FAILED.search(body.get("content") or "")
            if match and int(match.group(1)) == job_id:
                return match.group(2)
        return None


@dataclass
class Timed:
    job_id: int | None  # None for a /train (its job id is not what the member is shown)
    sent: float  # monotonic time the command was sent
    seconds: float  # sent -> what the member waited for was posted

    @property
    def ended(self) -> float:
        return self.sent + self.seconds


def imagine_options(prompt: str, **extra) -> list[dict]:
    types = {"steps": 4, "count": 4, "seed": 4}
    return [{"name": "prompt", "type": 3, "value": prompt}] + [
        {"name": name, "type": types[name], "value": value} for name, value in extra.items()]


def train_options(token: str, class_name: str, attachments: list[dict]) -> list[dict]:
    return [{"name": "token", "type": 3, "value": token}, {"name": "class", "type": 3, "value": class_name}] + [
        {"name": f"photo{index + 1}", "type": 11, "value": attachment["id"]}
        for index, attachment in enumerate(attachments)]


PEAK_LINE = re.compile(r"^boothbot_gpu_memory_peak_bytes\{[^}]*\} (\S+)$", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedBot:
    """`python -m bot run` on a fresh data directory in `workdir`, its log in `workdir/bot.log`."""

    def __init__(self, fake: ServingDiscord, workdir: Path, model: str, device: str, *, recipe: dict | None = None,
                 timeout_s: float = 900.0, compile_ahead: str = "off", gpu_memory_gib: float | None = None):
        self.fake, self.workdir, self.model, self.device = fake, workdir, model, device
        self.compile_ahead = compile_ahead  # BOOTHBOT_COMPILE_AHEAD
        self.gpu_memory_gib = gpu_memory_gib  # BOOTHBOT_GPU_MEMORY_GIB: a smaller card's settings on a big GPU
        self.recipe = recipe  # a TRAIN_RECIPE for the bot process (--tiny keeps trainings short); None: the default
        self.timeout_s = timeout_s
        self.log_path = workdir / "bot.log"
        self.db_path = workdir / "data" / "boothbot.sqlite3"
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = self.ready_at = 0.0
        self._log = None

    async def start(self) -> None:
        env = live_bot.bot_environment(self.workdir / "data", self.model, home=self.workdir,
                                       guild_ids=str(self.fake.guild_id), max_queued_jobs="20",
                                       trainings_per_day="20", device=self.device, log_level="info",
                                       compile_ahead=self.compile_ahead)
        if self.device != "cpu":
            env["BOOTHBOT_DTYPE"] = "auto"
        if self.gpu_memory_gib:
            env["BOOTHBOT_GPU_MEMORY_GIB"] = f"{self.gpu_memory_gib:g}"
        self.metrics_port = _free_port()
        env["BOOTHBOT_METRICS_PORT"] = str(self.metrics_port)
        setup = (f"import bot.services.submissions as submissions; submissions.TRAIN_RECIPE = {self.recipe!r}\n"
                 if self.recipe else "")
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.process = await live_bot.start_bot(self.fake.api_base, self.fake.gateway_url, env,
                                                env_file=self.workdir / "no.env", stdout=self._log, setup=setup)

    async def wait_ready(self) -> None:
        """Until the bot's commands are synced and its worker reported ready (the line in its log)."""
        deadline = time.monotonic() + self.timeout_s
        while READY_LINE not in self.log_text():
            if self.process.returncode is not None:
                raise BenchFailed(f"the bot exited with status {self.process.returncode} before its worker was "
                                  f"ready\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchFailed(f"the worker was not ready after {self.timeout_s:.0f} s\n{self.log_tail()}")
            await asyncio.sleep(0.01)
        self.ready_at = time.monotonic()
        await self._wait(lambda: str(self.fake.guild_id) in self.fake.commands, "the bot's slash commands")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._log is not None:
            self._log.close()

    async def gpu_peak_gb(self) -> float | None:
        """The most GPU memory the worker has reserved since it started (service, trainings, bursts), from the bot's
        Prometheus endpoint as an operator reads it; None on a CPU."""
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
                return response.read().decode()

        try:
            found = PEAK_LINE.findall(await asyncio.to_thread(scrape))
        except OSError:  # the endpoint did not start (the bot's log says why): the other figures stand
            return None
        return round(max(float(v) for v in found) / 2**30, 2) if found else None

    async def settle_compiled(self, within_s: float) -> dict:
        """Wait (the bot idle) until every shape the worker compiles ahead of time is in use or refused, at most
        `within_s`: the state a bot that has run a while is in. Returns the counts and the seconds waited."""
        began = time.monotonic()
        counts = compiled_ahead_counts(self.log_text())
        while counts["in_use"] + counts["refused"] < counts["requested"] and time.monotonic() - began < within_s:
            await asyncio.sleep(1.0)
            counts = compiled_ahead_counts(self.log_text())
        return {**counts, "waited_s": round(time.monotonic() - began, 1)}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "the bot's log ends:\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # --- what members do ----------------------------------------------------------------------------------------
    async def imagine(self, member: FakeMember, prompt: str, **options) -> Timed:
        """An /imagine to its result post in the channel."""
        sent = time.monotonic()
        interaction = await self.fake.command(member, "imagine", imagine_options(prompt, **options))
        answer = await self._wait(lambda: QUEUED.search(interaction.text()) or self._refused(interaction),
                                  f"the answer to {member.name}'s /imagine")
        if not isinstance(answer, re.Match):
            raise BenchFailed(f"{member.name}'s /imagine was refused: {answer}")
        job_id = int(answer.group(1))
        await self._wait(lambda: job_id in self.fake.result_at or self.fake.failure(job_id),
                         f"job {job_id}'s result")
        if job_id not in self.fake.result_at:
            raise BenchFailed(f"/imagine job {job_id} failed: {self.fake.failure(job_id)}\n{self.log_tail()}")
        return Timed(job_id, sent, self.fake.result_at[job_id] - sent)

    async def share(self, owner: FakeMember, token: str) -> None:
        """`/concepts share`: every member may use the concept from now on."""
        interaction = await self.fake.command(owner, "concepts", [{"name": "concept", "type": 3, "value": token}],
                                              subcommand=["share"])
        answer = await self._wait(lambda: interaction.text() if interaction.followups or interaction.replies
                                  else None, f"the answer to {owner.name}'s /concepts share")
        if "now shared" not in answer:
            raise BenchFailed(f"sharing {token} was refused: {answer}")

    async def train(self, member: FakeMember, token: str, class_name: str, photos: list[bytes]) -> Timed:
        """A /train with these photos to the "`token` is ready" post in the channel."""
        attachments = [self.fake.add_attachment(f"photo{i}.png", data) for i, data in enumerate(photos)]
        sent = time.monotonic()
        interaction = await self.fake.command(member, "train", train_options(token, class_name, attachments),
                                              attachments=attachments)
        ready = f"`{token}` is ready"

        def outcome():
            if (at := self.fake.posted(ready, sent)) is not None:
                return at
            if interaction.followups and "queued" not in interaction.text():  # the intake report says it is queued
                raise BenchFailed(f"{member.name}'s /train was refused: {interaction.text()}")
            for _, body in self.fake.posts:
                if f"<@{member.id}>" in (body.get("content") or "") and FAILED.search(body.get("content") or ""):
                    raise BenchFailed(f"{member.name}'s /train failed: {body['content']}\n{self.log_tail()}")
            return None
        at = await self._wait(outcome, f"the \"{ready}\" message", told=interaction.text)
        return Timed(None, sent, at - sent)

    @staticmethod
    def _refused(interaction) -> str | None:
        """The bot's answer when it is not "Queued as job N" (a limit, a bad option): the command was refused."""
        return interaction.text() if interaction.followups else None

    async def _wait(self, predicate, what: str, told=lambda: ""):
        try:
            return await self.fake.wait_for(predicate, self.timeout_s, what)
        except AssertionError as e:
            answer = told()
            raise BenchFailed(f"{e}" + (f"; the member was told: {answer!r}" if answer else "")
                              + f"\n{self.log_tail()}") from None
