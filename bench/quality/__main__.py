"""`python -m bench.quality`: the world model, its readers, and what a recipe does to a concept.

  build-model --out DIR [--size full|tiny]   train the world model + readers from scratch (full: GPU, minutes)
  check [--model DIR]                        readers' accuracy on renders, the world model's prompt following
  score [--model DIR] [--recipe NAME ...]    train a concept with the bot's engine per recipe; scores beside the base
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE


def _device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args):
    from bench.quality.world_model import load_world_pipeline, load_world_readers

    device = _device(args.device)
    pipe = load_world_pipeline(Path(args.model), device=device, dtype="fp32" if device == "cpu" else "bf16")
    return pipe, load_world_readers(Path(args.model), device)


def _plan(args):
    from bench.quality.generate import Sampling
    from bench.quality.scores import Plan

    if args.quick:  # what the CI test uses
        return Plan(per_prompt=4, class_images=16, other_images=8, sampling=Sampling(steps=15))
    return Plan()


def _deep_caches(args) -> list[int]:
    """The --deep-cache settings asked for, else the bot's default."""
    return args.deep_cache or [DEFAULT_DEEP_CACHE]


def build_model(args) -> int:
    from bench.quality.world_model import build

    info = build(Path(args.out), size=args.size, device=_device(args.device), seed=args.seed,
                 max_denoiser_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(json.dumps(info, indent=2))
    return 0


def check(args) -> int:
    from bench.quality import readers as readers_mod
    from bench.quality.generate import make_service
    from bench.quality.scores import prompt_following

    pipe, readers = _load(args)
    plan = _plan(args)
    sampling = replace(plan.sampling, steps=args.steps) if args.steps else plan.sampling
    service = make_service(pipe, _deep_caches(args)[-1])
    with tempfile.TemporaryDirectory() as tmp:
        following = prompt_following(service, readers, args.count, seed=7, out_dir=Path(tmp), sampling=sampling)
    report = {"readers_on_renders": readers_mod.accuracy(readers.cpu()), "prompt_following": following,
              "sampling": asdict(sampling),
              "deep_cache": _deep_caches(args)[-1]}
    print(json.dumps(report, indent=2))
    return 0


def score(args) -> int:
    from bench.quality import recipes

    pipe, readers = _load(args)
    names = args.recipe or ["default"]
    unknown = [n for n in names if n not in recipes.RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(recipes.RECIPES)}")
    from bench.quality.scores import SUBJECTS

    subjects = args.subject or ["man"]
    started = time.monotonic()
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects:
            tables[subject] = recipes.run(pipe, readers, names, Path(args.work or tmp) / subject,
                                          concept=SUBJECTS[subject], plan=_plan(args),
                                          deep_caches=tuple(_deep_caches(args)),
                                          log=lambda line: print(f"{subject} {line}", file=sys.stderr, flush=True))
            print(f"\n{subject}: {SUBJECTS[subject].subject}\n{recipes.markdown(tables[subject])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=2) + "\n", encoding="utf-8")
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.quality.world_model import ASSET_DIR

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build-model", help="train the world model and its readers from scratch")
    b.add_argument("--out", required=True)
    b.add_argument("--size", choices=("full", "tiny"), default="full")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-minutes", type=float, default=None, help="stop the denoiser's training after this long")
    for name, helptext in (("check", "readers' accuracy and the world model's prompt following"),
                           ("score", "train a concept per recipe with the bot's engine and score it")):
        c = commands.add_parser(name, help=helptext)
        c.add_argument("--model", default=str(ASSET_DIR), help="the world model folder (default: the committed one, %(default)s)")
        c.add_argument("--quick", action="store_true", help="fewer, shorter generations (the CI test's plan)")
        if name == "check":
            c.add_argument("--count", type=int, default=256, help="captions to generate (default: %(default)s)")
            c.add_argument("--steps", type=int, default=None,
                           help="sampler steps per picture (default: the bot's /imagine default)")
        else:
            c.add_argument("--recipe", action="append", help="a recipe name (repeatable; default: default)")
            c.add_argument("--subject", action="append", choices=("man", "woman", "dog", "cat"),
                           help="whose photos (repeatable: a table each; default: man)")
            c.add_argument("--work", help="keep photos, LoRAs and pictures here (default: a temporary folder)")
            c.add_argument("--json", help="also write the rows as JSON here")
    for sub in commands.choices.values():
        sub.add_argument("--device", default="auto")
    for name, more in (("check", ""), ("score", "; repeatable: the same LoRAs scored under each")):
        commands.choices[name].add_argument(
            "--deep-cache", type=int, action="append", metavar="N",
            help=f"the pictures' BOOTHBOT_DEEP_CACHE: a whole UNet forward every N-th sampler step (1: off; default "
                 f"{DEFAULT_DEEP_CACHE}, the bot's){more}")
    args = parser.parse_args(argv)
    from trainer.quiet import quiet_libraries

    quiet_libraries(args.debug)
    return {"build-model": build_model, "check": check, "score": score}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
