"""`python -m bench.serving`: speed as members feel it, through the real bot (issue 15), beside the engine bench.

The real `python -m bot run` as its own process with its GPU worker (bench/serving/served_bot.py), driven through the
wire-level fake Discord from a fresh data directory: /train (5 photos, the default recipe) to the "ready" post, cold
and with the class images cached; /imagine (command -> result post) alone, the first once the worker reports ready,
during a training (another member, a few seconds into it), with the new concept; bursts of members' /imagine at once
(images/s), without concepts and with the two trained concepts mixed. Then, in the same command, `python -m bench`'s
reference-vs-ours rows for training, /imagine and throughput (bench/run.py). Prints a markdown table, then the whole
report as one line of JSON.
`--tiny` (tiny model, CPU, a short recipe) checks every path in a few minutes: tests/bench/test_serving.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from bench.lag import prepare_model
from bench.serving.measure import Plan, measure
from bench.serving.report import markdown, served_rows
from bench.serving.served_bot import BenchFailed, ServedBot, ServingDiscord

# The tiny model learns nothing in a default-length training on a CPU; this keeps the same stages (class images,
# training, samples) to seconds. Anything else runs the bot's default recipe.
TINY_RECIPE = {"steps": 6, "class_images": 2, "sample_count": 1, "resolution": 64}
ENGINE_SECTIONS = "train,imagine,throughput"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model on the CPU, short recipe, 2-step /imagine: the CI form")
    parser.add_argument("--model", default=None,
                        help="a diffusers directory, or random-sd15 (default; --tiny: the tiny random model)")
    parser.add_argument("--device", default=None, help="the worker's device (default cuda; --tiny: cpu)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of each /imagine (default: the bot's own default; --tiny: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="/imagine alone and with the concept, each (default 20; --tiny: 3)")
    parser.add_argument("--during-after", type=float, default=None,
                        help="seconds after the /train is sent that another member's first /imagine goes out "
                             "(default 8; --tiny: 0.5)")
    parser.add_argument("--during-every", type=float, default=5.0,
                        help="seconds between that member's next /imagine jobs while the training runs (default 5)")
    parser.add_argument("--burst-members", type=int, default=8, help="members in each burst (default 8)")
    parser.add_argument("--burst-rounds", type=int, default=3, help="bursts (default 3)")
    parser.add_argument("--compile-ahead", choices=("off", "auto", "on"), default="auto",
                        help="the bot's BOOTHBOT_COMPILE_AHEAD (default auto, the bot's default)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="the bot's BOOTHBOT_GPU_MEMORY_GIB: the worker uses at most this much of the GPU and "
                             "chooses its settings as on such a card (e.g. 11.5 for a 12 GB card; default: all of it)")
    parser.add_argument("--settle", type=float, default=None,
                        help="before /imagine alone, wait up to this many seconds (the bot idle) until the shapes the "
                             "worker compiles ahead of time are in use, as in a bot that has run a while "
                             "(default 600; --tiny: 30, which a CPU worker, compiling nothing, does not wait)")
    parser.add_argument("--engine", default=ENGINE_SECTIONS,
                        help=f"`python -m bench` sections run after the bot (default {ENGINE_SECTIONS}; none: skip)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for any one thing the bot does")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--bot-log", type=Path, default=None, help="keep the bot process's log in this file")
    parser.add_argument("--work-dir", default=None, help="where temporary files go (default: the system temp dir)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.model = args.model or (None if tiny else "random-sd15")
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.steps = args.steps or (2 if tiny else None)
    args.repeats = args.repeats or (3 if tiny else 20)
    args.during_after = args.during_after if args.during_after is not None else (0.5 if tiny else 8.0)
    args.settle = args.settle if args.settle is not None else (30.0 if tiny else 600.0)
    if args.repeats < 1 or args.burst_members < 1 or args.burst_rounds < 1:
        parser.error("--repeats, --burst-members and --burst-rounds must be at least 1")
    if args.during_after < 0 or args.during_every <= 0:
        parser.error("--during-after must be 0 or more and --during-every more than 0")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(imagine_options={"steps": args.steps} if args.steps else {}, repeats=args.repeats,
                during_after_s=args.during_after, during_every_s=args.during_every,
                burst_members=args.burst_members, burst_rounds=args.burst_rounds, photo_side=256 if args.tiny else 512,
                settle_s=args.settle)


async def through_the_bot(args: argparse.Namespace, workdir: Path, served: dict) -> None:
    """Measure into `served`, so the figures taken before a failure are kept."""
    model = prepare_model(args.model, workdir)
    fake = ServingDiscord()
    await fake.start()
    bot = ServedBot(fake, workdir, model, args.device, recipe=TINY_RECIPE if args.tiny else None,
                    timeout_s=args.timeout, compile_ahead=args.compile_ahead, gpu_memory_gib=args.gpu_memory_gib)
    try:
        await bot.start()
        await measure(bot, plan_of(args), served)
    finally:
        await bot.stop()
        await fake.close()
        if args.bot_log and bot.log_path.exists():
            shutil.copyfile(bot.log_path, args.bot_log)


def engine_config(args: argparse.Namespace):
    """The `python -m bench --only SECTIONS` config (--tiny with --tiny), checked before the bot runs; None: skipped."""
    if args.engine == "none":
        return None
    from bench.run import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--only", args.engine] + (["--tiny"] if args.tiny else ["--device", args.device])
    return config_from_args(parser.parse_args(argv + (["--work-dir", args.work_dir] if args.work_dir else [])))


def engine_reference(cfg) -> dict:
    """`python -m bench`'s run for `cfg`: its comparison rows, model and errors."""
    from bench.run import _quiet_libraries, run_bench

    _quiet_libraries(False)
    if cfg.tiny:
        import torch

        torch.set_num_threads(1)  # as `python -m bench --tiny` does
    report = run_bench(cfg)
    return {"command": f"python -m bench --only {','.join(cfg.sections)}" + (" --tiny" if cfg.tiny else ""),
            "model": cfg.model, "rows": report["rows"], "metrics": report["metrics"], "errors": report["errors"]}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from bench.report import environment

    engine_cfg = engine_config(args)  # a mistake in --engine or --device shows before minutes of bot work
    errors: dict[str, str] = {}
    served: dict = {}
    with tempfile.TemporaryDirectory(prefix="boothbot-serving-", dir=args.work_dir) as tmp:
        try:
            asyncio.run(through_the_bot(args, Path(tmp), served))
        except BenchFailed as e:
            errors["through the bot"] = str(e)
    engine = None
    if engine_cfg is not None:
        try:
            engine = engine_reference(engine_cfg)
            errors.update({f"engine {where}": error for where, error in engine["errors"].items()})
        except Exception as e:  # noqa: BLE001 - the figures through the bot are kept and the failure reported
            traceback.print_exc()
            errors["engine"] = f"{type(e).__name__}: {e}"
    return {
        "environment": environment(args.device),
        "config": {"model": args.model or "tiny random SD (64 px)", "device": args.device,
                   "recipe": TINY_RECIPE if args.tiny else "default", "imagine_options": plan_of(args).imagine_options,
                   "repeats": args.repeats, "during_after_s": args.during_after,
                   "during_every_s": args.during_every, "burst_members": args.burst_members,
                   "burst_rounds": args.burst_rounds, "gpu_memory_gib": args.gpu_memory_gib,
                   "command": "python -m bench.serving " + shlex.join(argv)},
        "served": served, "served_rows": served_rows(served), "engine": engine, "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, argv)
    print(markdown(report), flush=True)
    print(json.dumps(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
