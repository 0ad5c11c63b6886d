"""One soak run: start the fake Discord and the bot, keep members busy, kill -9 the bot or its worker `kills` times,
restart what the bot does not restart itself, check the invariants after each kill and at the end.

The seed fixes the choices (who does what, which process dies, whether a kill waits for an outcome post), not the
timing: the processes run at their own pace, so two runs with one seed differ in detail.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak import processes
from bench.soak.database import JobRow, integrity, read_jobs
from bench.soak.invariants import DOWN, FINAL, RUNNING, Violation, check_integrity, check_jobs
from bench.soak.outcomes import CHANNEL_POST, announced_jobs, is_outcome_post, is_result
from bench.soak.processes import BotProcess
from bench.soak.traffic import Members, Told
from bench.wire import live_bot
from bench.wire.fake_discord import FakeDiscord

log = logging.getLogger("bench.soak")

# Keeps tiny-model trainings to seconds (as tests/wire/test_train.py does): no class images, one sample, 64 px.
TRAIN_RECIPE = {"prior_preservation": False, "sample_count": 1, "resolution": 64}
BOT_SETTINGS = dict(train_slice_s=2, imagine_between_slices_s=2, max_queued_jobs=20, trainings_per_day=100,
                    min_photos=3, imagine_timeout_s=120, train_timeout_s=600)
PROGRESS_TIMEOUT_S = 240.0   # after a restart, how long to wait for the worker's next result before killing anyway
ORPHAN_TIMEOUT_S = 60.0      # a killed bot's worker must exit by itself (its stdin closed) within this
ANSWERS_TIMEOUT_S = 15.0  # at the end: commands sent to a bot that was then killed stay unanswered


@dataclass
class SoakOptions:
    kills: int = 30
    seed: int = 0
    members: int = 4
    max_open_jobs: int = 6        # members send more only while fewer of their jobs wait for an outcome
    settle_s: float = 300.0       # after the last kill: how long every job gets to end and be announced
    hold_s: float = 0.4           # the fake holds channel-message POSTs this long before, and again after, handling
    pause_s: tuple[float, float] = (1.0, 6.0)  # traffic between the first outcome after a restart and the next kill
    result_post_kill_share: float = 0.5         # of bot kills, how many wait for an outcome post to be in flight
    model: Path | None = None     # a tiny model directory to use; None: build one in the work directory


@dataclass
class Kill:
    number: int
    target: str                  # "bot" | "worker"
    during_outcome_post: bool
    at_s: float


@dataclass
class SoakResult:
    options: SoakOptions
    kills: list[Kill] = field(default_factory=list)
    jobs: dict[int, JobRow] = field(default_factory=dict)
    outcomes: dict[int, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    told: Told | None = None
    integrity_checks: list[str] = field(default_factory=list)
    abandoned_posts: int = 0
    bot_starts: int = 0
    seconds: float = 0.0
    workdir: Path | None = None


class Soak:
    def __init__(self, options: SoakOptions, workdir: Path):
        self.options = options
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.kill_rng = random.Random(options.seed)
        self.fake = FakeDiscord()
        self.members = Members(self.fake, random.Random(options.seed + 1), workdir / "photos", options.members)
        self.result = SoakResult(options, told=self.members.told, workdir=workdir)
        self.job_of_token: dict[str, int] = {}
        self.owner_of_training: dict[int, object] = {}
        self.history: dict[int, list[str]] = collections.defaultdict(list)
        self.workers_seen: set[int] = set()
        self._seen: set[tuple] = set()
        self._started = time.monotonic()
        self.bot: BotProcess | None = None
        self._traffic_task: asyncio.Task | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "boothbot.sqlite3"

    # ----- the run -----------------------------------------------------------------------------------------------
    async def run(self) -> SoakResult:
        model = self.options.model or await build_tiny_model(self.workdir / "model")
        self._say(f"tiny model at {model}")
        await self.fake.start()
        traffic = None
        try:
            self.fake.delay_answers("POST", CHANNEL_POST.pattern, before_s=self.options.hold_s,
                                    after_s=self.options.hold_s)
            env = live_bot.bot_environment(self.data_dir, model, home=self.workdir, guild_ids=self.fake.guild_id,
                                           **BOT_SETTINGS)
            setup = f"import bot.services.submissions as s; s.TRAIN_RECIPE = {TRAIN_RECIPE!r}\n"
            self.bot = BotProcess(self.fake, env, env_file=self.workdir / "no.env", log_path=self.workdir / "bot.log",
                                  setup=setup)
            await self.bot.start()
            self._say("bot connected")
            traffic = self._traffic_task = asyncio.create_task(self._traffic(), name="soak-traffic")
            for number in range(1, self.options.kills + 1):
                await self._between_kills()
                if self.kill_rng.random() < 0.5:
                    await self._kill_bot(number)
                else:
                    await self._kill_worker(number)
            traffic.cancel()
            await self.members.settle(ANSWERS_TIMEOUT_S)
            self._say("traffic stopped; waiting for every job to end and be announced")
            await self._settle()
            self._say("settled; stopping the bot")
            await self.bot.stop()
            self._check_down("at the end", FINAL)
        finally:
            if traffic is not None:
                traffic.cancel()
            await self._cleanup()
        self.result.seconds = time.monotonic() - self._started
        self.result.bot_starts = self.bot.starts if self.bot else 0
        self.result.abandoned_posts = len(self.fake.abandoned)
        return self.result

    async def _traffic(self) -> None:
        rng = random.Random(self.options.seed + 2)
        while True:
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            if self.bot.pid is None or not self.fake._ws:
                continue
            self._learn_trainings(read_jobs(self.db_path))
            open_jobs = self._open_jobs()
            pending = len(set(self.members.told.trainings) - set(self.job_of_token))
            if len(open_jobs) + pending < self.options.max_open_jobs:
                try:
                    await self.members.act(open_jobs)
                except (AssertionError, ConnectionError):
                    pass  # the bot was killed between the check and the command: the fake has no one to send it to

    async def _between_kills(self) -> None:
        """Let the worker show it works (a result for a job newer than every job so far), then a little more
        traffic. So no kill lands while the first worker loads the model: the bot gives up when that one dies."""
        if self._traffic_task.done():
            self._traffic_task.result()  # raises what stopped the members
        newest = max(read_jobs(self.db_path), default=0)
        if not await self._wait_until(lambda: max(self._result_jobs(), default=0) > newest, PROGRESS_TIMEOUT_S):
            self._say(f"no result for a new job within {PROGRESS_TIMEOUT_S:.0f} s")
        await asyncio.sleep(self.kill_rng.uniform(*self.options.pause_s))

    async def _wait_until(self, predicate, timeout: float) -> bool:
        """Poll `predicate` until it holds or `timeout` passes; a bot that exits meanwhile is restarted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self._restart_if_exited()
            if predicate():
                return True
            await asyncio.sleep(0.5)
        return False

    async def _restart_if_exited(self) -> None:
        """The bot stopped without being killed: a violation (it should keep running); start it again."""
        if self.bot.pid is not None:
            return
        self._say("the bot exited by itself; starting it again")
        lines = self.bot.log_path.read_text(errors="replace").strip().splitlines()
        at = f"{time.monotonic() - self._started:.0f} s into the soak"
        self._violate(Violation("bot exited", None, f"the bot exited by itself with code {self.bot.proc.returncode}:"
                                                    f" {lines[-1] if lines else ''}", at))
        self._check_down(at, DOWN)
        await self.bot.start()

    async def _kill_bot(self, number: int) -> None:
        during_post = self.kill_rng.random() < self.options.result_post_kill_share
        if during_post:
            since = len(self.fake.requests)
            try:
                await self.fake.wait_for(lambda: any(is_outcome_post(r.method, r.path, r.json)
                                                     for r in self.fake.requests[since:]),
                                         PROGRESS_TIMEOUT_S, "an outcome post")
                # Held before or after the fake handles it: the kill lands in one of the two halves.
                await asyncio.sleep(self.kill_rng.uniform(0, 2 * self.options.hold_s))
            except AssertionError:
                during_post = False
        abandoned = len(self.fake.abandoned)
        self._remember_worker()
        orphan = await self.bot.kill()
        self.result.kills.append(Kill(number, "bot", during_post, time.monotonic() - self._started))
        self._say(f"kill {number}: the bot" + (" (an outcome post in flight)" if during_post else ""))
        await asyncio.sleep(self.options.hold_s + 0.5)  # a post held at the fake is now dropped or answered
        for record in self.fake.abandoned[abandoned:]:
            for job_id in announced_jobs(record.json or {}, self.job_of_token):
                self.history[job_id].append(f"its outcome post was dropped: the bot was killed while it was in "
                                            f"flight (kill {number})")
        at = f"after kill {number} (bot)"
        if orphan is not None and not await processes.wait_gone(orphan, ORPHAN_TIMEOUT_S):
            self._violate(Violation("orphan worker", None, f"the killed bot's worker (pid {orphan}) still ran "
                                                           f"{ORPHAN_TIMEOUT_S:.0f} s later", at))
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
        self._check_down(at, DOWN)
        await self.bot.start()
        self._say("bot restarted and connected")

    async def _kill_worker(self, number: int) -> None:
        pid = await self.bot.wait_worker()
        if pid is None:
            return
        self.workers_seen.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.result.kills.append(Kill(number, "worker", False, time.monotonic() - self._started))
        self._say(f"kill {number}: the worker")
        replacement = await self.bot.wait_worker(other_than=pid)
        if replacement is None and self.bot.pid is not None:
            self._violate(Violation("no worker", None, "the bot did not start a new worker within 120 s",
                                    f"after kill {number} (worker)"))
        self._check_running(f"after kill {number} (worker)")

    async def _settle(self) -> None:
        """Wait until every job has ended and the bot has announced it, or the settle time is over."""
        def settled() -> bool:
            jobs = read_jobs(self.db_path)
            self._learn_trainings(jobs)
            outcomes = self._outcomes()
            # Done: every job ended and is announced, or marked delivered (then nothing more will come for it).
            return (all(job.is_terminal and (job.delivered or outcomes.get(job.id, 0) >= 1) for job in jobs.values())
                    and set(self.members.told.trainings) <= set(self.job_of_token))
        await self._wait_until(settled, self.options.settle_s)
        await asyncio.sleep(2 * self.options.hold_s + 1.0)  # a second announcement would show up by now

    async def _cleanup(self) -> None:
        if self.bot is not None and self.bot.pid is not None:
            self._remember_worker()
            await self.bot.stop(timeout=30)
        for pid in self.workers_seen:
            if processes.is_alive(pid) and processes.is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await self.fake.close()

    # ----- checks ------------------------------------------------------------------------------------------------
    def _check_down(self, at: str, stage: str) -> None:
        result = integrity(self.db_path)
        self.result.integrity_checks.append(result)
        for violation in check_integrity(result, at=at):
            self._violate(violation)
        jobs = read_jobs(self.db_path)
        self._learn_trainings(jobs)
        self._check(jobs, at, stage)
        if stage == FINAL:
            self.result.jobs = jobs
            self.result.outcomes = self._outcomes()

    def _check_running(self, at: str) -> None:
        jobs = read_jobs(self.db_path)
        self._learn_trainings(jobs)
        self._check(jobs, at, RUNNING)

    def _check(self, jobs: dict[int, JobRow], at: str, stage: str) -> None:
        history = {job_id: "; ".join(lines) for job_id, lines in self.history.items()}
        for violation in check_jobs(jobs, self._outcomes(), told_imagines=self.members.told.imagines,
                                    told_tokens=self.members.told.trainings, at=at, stage=stage, history=history):
            self._violate(violation)

    def _violate(self, violation: Violation) -> None:
        key = (violation.rule, violation.job_id if violation.job_id is not None else violation.what)
        if key not in self._seen:  # the first time it is seen; later checks find the same one again
            self._seen.add(key)
            self.result.violations.append(violation)

    # ----- what the soak knows -----------------------------------------------------------------------------------
    def _outcomes(self) -> dict[int, int]:
        counts: collections.Counter[int] = collections.Counter()
        for message in self.fake.channel_messages():
            counts.update(announced_jobs(message, self.job_of_token))
        return dict(counts)

    def _say(self, what: str) -> None:
        log.info("[%5.0f s] %s", time.monotonic() - self._started, what)

    def _result_jobs(self) -> set[int]:
        """The jobs whose successful result is in the channel."""
        return {job_id for message in self.fake.channel_messages() if is_result(message)
                for job_id in announced_jobs(message, self.job_of_token)}

    def _learn_trainings(self, jobs: dict[int, JobRow]) -> None:
        for job in jobs.values():
            if job.token and job.token not in self.job_of_token:
                self.job_of_token[job.token] = job.id
                if (owner := self.members.told.trainings.get(job.token)) is not None:
                    self.owner_of_training[job.id] = owner

    def _open_jobs(self) -> dict[int, object]:
        outcomes = self._outcomes()
        known = {**self.members.told.imagines, **self.owner_of_training}
        return {job_id: owner for job_id, owner in known.items() if not outcomes.get(job_id)}

    def _remember_worker(self) -> None:
        if self.bot is not None and (pid := self.bot.worker_pid()) is not None:
            self.workers_seen.add(pid)


async def build_tiny_model(directory: Path) -> Path:
    """The tiny random model, written by `python -m trainer make-tiny-model` (torch stays out of this process)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "trainer", "make-tiny-model", str(directory),
                                                cwd=live_bot.REPO_ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"could not build the tiny model:\n{output.decode(errors='replace')}")
    return directory


async def run_soak(options: SoakOptions, workdir: Path) -> SoakResult:
    return await Soak(options, workdir).run()
