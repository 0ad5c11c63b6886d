"""`python -m bench.burst`: a burst of /imagine through the real bot process, measured from the fake Discord.

The bot is `python -m bot run` as its own process (bench/wire/live_bot.py; a lag probe runs on its event loop, see
bench/wire/bot_probes.py) with its GPU worker (the tiny random model on the CPU, or `--model` on `--device`), talking
to the wire-level fake Discord in this process. N /imagine commands from M members are dispatched at once, a
/queue show probe goes out every `--probe-every` seconds while the burst is taken in, and the run reports:
- ack latency: command sent → the bot's deferral (Discord's 3 s window);
- /queue probe latency: command sent → its answer;
- follow-up latency: command sent → "Queued as job N";
- the bot's event-loop lag during the burst (from the first command to the last result);
- delivery: result posts per job in the channel (exactly one each is right).
Targets (issue 12): every ack < 0.5 s, follow-up p99 <= 1 s, loop lag p99 <= 20 ms and max <= 100 ms, every job
delivered exactly once. `--quick` (40 from 8) is the CI form: tests/bench/test_burst.py checks correctness only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.lag import prepare_model
from bench.loop_probe import summarize
from bench.wire import bot_probes, live_bot
from bench.wire.fake_discord import FakeDiscord, FakeMember

TARGETS = {"ack_max_s": 0.5, "followup_p99_s": 1.0, "lag_p99_ms": 20.0, "lag_max_ms": 100.0}
START_TIMEOUT_S = 300.0
QUEUED = re.compile(r"Queued as job (\d+)")
RESULT_BUTTON = re.compile(r"^bb:reroll:(\d+)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=500, help="/imagine commands in the burst (default 500)")
    parser.add_argument("--members", type=int, default=50, help="members sending them (default 50)")
    parser.add_argument("--quick", action="store_true", help="40 commands from 8 members (the CI form)")
    parser.add_argument("--model", default=None,
                        help="a diffusers directory or random-sd15 (default: the tiny random model)")
    parser.add_argument("--device", default="cpu", help="the worker's device (default cpu; cuda for --model)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps of each /imagine (default 1)")
    parser.add_argument("--probe-every", type=float, default=0.2, help="seconds between /queue show probes")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every result")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of the bot process's loop thread to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.quick:
        args.commands, args.members = 40, 8
    if args.commands < 1 or not 1 <= args.members <= args.commands:
        parser.error("need at least one command and 1..commands members")
    return args


class TimedDiscord(FakeDiscord):
    """The fake Discord, noting when each interaction got its first callback and its first follow-up."""

    def __init__(self) -> None:
        super().__init__()
        self.answered_at: dict[str, float] = {}
        self.followed_up_at: dict[str, float] = {}
        self.result_posts: dict[int, int] = {}  # job id -> channel messages carrying its result buttons

    def _callback(self, token, body, files):
        self.answered_at.setdefault(token, time.monotonic())
        return super()._callback(token, body, files)

    def _webhook(self, method, parts, body, files, request):
        if len(parts) == 3 and method == "POST":
            self.followed_up_at.setdefault(parts[2], time.monotonic())
        return super()._webhook(method, parts, body, files, request)

    def _channel_message(self, method, channel_id, rest, body, files):
        if not rest and method == "POST":  # counted as they come: the waits below re-check after every request
            for job_id in result_job_ids(body or {}):
                self.result_posts[job_id] = self.result_posts.get(job_id, 0) + 1
        return super()._channel_message(method, channel_id, rest, body, files)


def result_job_ids(message: dict) -> set[int]:
    """The jobs whose result buttons a message carries."""
    return {int(match.group(1)) for row in message.get("components") or [] for component in row.get("components") or []
            if (match := RESULT_BUTTON.match(str(component.get("custom_id", ""))))}


@dataclass
class Sent:
    token: str
    at: float
    kind: str  # "imagine" | "probe"
    job_id: int | None = None


@dataclass
class Run:
    fake: TimedDiscord
    sent: list[Sent] = field(default_factory=list)

    async def command(self, member: FakeMember, kind: str, name: str, options=None, subcommand=()) -> Sent:
        at = time.monotonic()
        interaction = await self.fake.command(member, name, options, subcommand=list(subcommand))
        sent = Sent(interaction.token, at, kind)
        self.sent.append(sent)
        return sent

    def of(self, kind: str) -> list[Sent]:
        return [s for s in self.sent if s.kind == kind]

    def latencies(self, kind: str, stamps: dict[str, float]) -> list[float]:
        return [stamps[s.token] - s.at for s in self.of(kind) if s.token in stamps]


def imagine_options(index: int, steps: int) -> list[dict]:
    return [{"name": "prompt", "type": 3, "value": f"a photo of a dog number {index}"},
            {"name": "steps", "type": 4, "value": steps}]


def seconds(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    out = {"count": len(values), "p50_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}
    if len(values) >= 2:
        out["p99_s"] = round(statistics.quantiles(values, n=100, method="inclusive")[98], 3)
    return out


async def start(fake: TimedDiscord, args: argparse.Namespace, workdir: Path, model: str):
    per_member = -(-args.commands // args.members) + 2  # the burst plus the warm-up and slack
    env = live_bot.bot_environment(workdir / "data", model, home=workdir, guild_ids=str(fake.guild_id),
                                   max_queued_jobs=str(min(per_member, 100)), device=args.device,
                                   log_level="warning")
    if args.device != "cpu":
        env["BOOTHBOT_DTYPE"] = "auto"
    env[bot_probes.LAG_FILE_ENV] = str(workdir / "lag.json")
    if args.profile:
        env[bot_probes.PROFILE_FILE_ENV] = str(args.profile.resolve())
    log = open(workdir / "bot.log", "wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", bot_probes.SCRIPT, fake.api_base, fake.gateway_url, "run",
        "--env-file", str(workdir / "no.env"), cwd=live_bot.REPO_ROOT, env=env, stdout=log,
        stderr=asyncio.subprocess.STDOUT)
    return process, log


async def warm_up(run: Run, member: FakeMember, steps: int) -> None:
    """One /imagine to its result: the bot is connected, its commands synced and the worker has loaded the model."""
    fake = run.fake
    await fake.wait_connected(START_TIMEOUT_S)
    await fake.wait_for(lambda: str(fake.guild_id) in fake.commands, START_TIMEOUT_S, "the bot's commands")
    sent = await run.command(member, "warm-up", "imagine", imagine_options(-1, steps))
    run.sent.remove(sent)
    await fake.wait_for(lambda: fake.result_posts, START_TIMEOUT_S, "the warm-up /imagine's result")


async def burst(run: Run, members: list[FakeMember], args: argparse.Namespace) -> dict:
    fake = run.fake
    started_wall, started = time.time(), time.monotonic()
    before = set(fake.result_posts)

    async def probes() -> None:
        index = 0
        while True:
            await run.command(members[index % len(members)], "probe", "queue", subcommand=["show"])
            index += 1
            await asyncio.sleep(args.probe_every)

    probing = asyncio.create_task(probes())
    await asyncio.gather(*(run.command(members[i % len(members)], "imagine", "imagine",
                                       imagine_options(i, args.steps)) for i in range(args.commands)))
    imagines = run.of("imagine")

    tokens = {s.token for s in imagines}

    def all_followed_up() -> bool:
        return len(fake.followed_up_at.keys() & tokens) == len(tokens)
    try:
        await fake.wait_for(all_followed_up, args.timeout, "every 'Queued as job N' follow-up")
    finally:
        probing.cancel()
    taken_in_s = time.monotonic() - started
    for sent in imagines:
        text = "\n".join(m.get("content") or "" for m in fake.interactions[sent.token].followups)
        if match := QUEUED.search(text):
            sent.job_id = int(match.group(1))
    job_ids = {s.job_id for s in imagines if s.job_id is not None}

    def all_delivered() -> bool:
        return job_ids <= fake.result_posts.keys()
    try:
        await fake.wait_for(all_delivered, args.timeout, "every job's result")
    except AssertionError:
        pass  # reported below as jobs not delivered
    finished_wall, finished = time.time(), time.monotonic()
    await asyncio.sleep(2.0)  # a second post of a job would show up now
    posts = fake.result_posts
    return {"window": (started_wall, finished_wall), "taken_in_s": round(taken_in_s, 2),
            "burst_s": round(finished - started, 2), "job_ids": job_ids,
            "posts": {job_id: posts.get(job_id, 0) for job_id in job_ids},
            "stray_posts": sum(n for job_id, n in posts.items() if job_id not in job_ids and job_id not in before)}


async def stop(process, log) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
    log.close()


def loop_lag(path: Path, window: tuple[float, float]) -> dict:
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError):
        return {"samples": 0, "error": "the bot wrote no lag samples (did it stop cleanly?)"}
    inside = [(at, ms) for at, ms in samples if window[0] <= at <= window[1]]
    worst = sorted(inside, key=lambda sample: sample[1])[-5:]
    return {**summarize([ms for _, ms in inside]),
            "worst": [[round(at - window[0], 2), round(ms, 1)] for at, ms in reversed(worst)]}  # [s into it, ms]


async def bench(args: argparse.Namespace, workdir: Path) -> dict:
    model = prepare_model(args.model, workdir)
    fake = TimedDiscord()
    await fake.start()
    process, log = await start(fake, args, workdir, model)
    run = Run(fake)
    try:
        members = [fake.member(f"member{i}") for i in range(args.members)]
        await warm_up(run, fake.member("warmup"), args.steps)
        outcome = await burst(run, members, args)
    finally:
        await stop(process, log)
        await fake.close()
    imagines = run.of("imagine")
    acks = run.latencies("imagine", fake.answered_at)
    followups = run.latencies("imagine", fake.followed_up_at)
    probes = run.latencies("probe", fake.answered_at)
    posts = outcome["posts"]
    lag = loop_lag(workdir / "lag.json", outcome["window"])
    delivery = {"jobs": len(posts), "exactly_once": sum(n == 1 for n in posts.values()),
                "missing": sorted(j for j, n in posts.items() if n == 0),
                "duplicated": sorted(j for j, n in posts.items() if n > 1), "stray_posts": outcome["stray_posts"]}
    result = {
        "commands": args.commands, "members": args.members, "steps": args.steps, "model": args.model or "tiny",
        "device": args.device, "cpu_count": os.cpu_count(),
        "taken_in_s": outcome["taken_in_s"], "burst_s": outcome["burst_s"],
        "ack": seconds(acks), "acks_missing": len(imagines) - len(acks),
        "followup": seconds(followups), "followups_missing": len(imagines) - len(followups),
        "queue_probe": {**seconds(probes), "unanswered": len(run.of("probe")) - len(probes)},
        "loop_lag": lag, "delivery": delivery, "targets": TARGETS,
    }
    result["correct"] = (result["acks_missing"] == 0 and result["followups_missing"] == 0
                         and delivery["exactly_once"] == len(imagines) and not delivery["stray_posts"])
    result["targets_met"] = {
        "ack_max_s": bool(acks) and max(acks) < TARGETS["ack_max_s"],
        "followup_p99_s": result["followup"].get("p99_s", 1e9) <= TARGETS["followup_p99_s"],
        "lag_p99_ms": lag.get("p99_ms", 1e9) <= TARGETS["lag_p99_ms"],
        "lag_max_ms": lag.get("max_ms", 1e9) <= TARGETS["lag_max_ms"],
    }
    return result


def print_table(result: dict) -> None:
    print(f"burst: {result['commands']} /imagine from {result['members']} members, {result['steps']} step(s), "
          f"model {result['model']} on {result['device']}, {result['cpu_count']} CPUs; taken in "
          f"{result['taken_in_s']} s, every result in {result['burst_s']} s")
    print(f"{'measure':<28} {'count':>6} {'p50':>9} {'p99':>9} {'max':>9}  target")
    rows = [("ack (s)", result["ack"], "every < 0.5 s"), ("/queue probe (s)", result["queue_probe"], "< 3 s"),
            ("'queued as job N' (s)", result["followup"], "p99 <= 1 s")]
    for name, s, target in rows:
        print(f"{name:<28} {s.get('count', 0):>6} {s.get('p50_s', '-'):>9} {s.get('p99_s', '-'):>9} "
              f"{s.get('max_s', '-'):>9}  {target}")
    lag = result["loop_lag"]
    print(f"{'bot loop lag (ms)':<28} {lag.get('samples', 0):>6} {lag.get('p50_ms', '-'):>9} "
          f"{lag.get('p99_ms', '-'):>9} {lag.get('max_ms', '-'):>9}  p99 <= 20, max <= 100")
    d = result["delivery"]
    print(f"delivered exactly once: {d['exactly_once']}/{result['commands']} (missing {len(d['missing'])}, "
          f"duplicated {len(d['duplicated'])}, stray {d['stray_posts']}); acks missing {result['acks_missing']}, "
          f"follow-ups missing {result['followups_missing']}")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="boothbot-burst-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
