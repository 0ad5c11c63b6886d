"""`python -m trainer make-tiny-model DIR`."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write the pipeline (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from trainer.quiet import quiet_libraries
    from trainer.tiny import make_tiny_model

    quiet_libraries(args.debug)
    path = make_tiny_model(args.directory, seed=args.seed)
    print(f"tiny Stable Diffusion pipeline written to {path}")
    return 0
