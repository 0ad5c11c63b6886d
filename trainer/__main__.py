"""`python -m trainer ...`: the engine without Discord, for operators and tests.

Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`; those modules import torch only
inside `run`, so `--help` stays fast. Every subcommand takes `--debug`: the libraries' own warnings and progress bars
show (trainer/quiet.py), and a SetupError (missing model, no network, unwritable folder), which otherwise ends the
command with its one-line message and exit status 2, shows its traceback too. BOOTHBOT_LOG_LEVEL=debug does the same.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer import worker
from trainer.cli import imagine, tiny, train
from trainer.contract.errors import SetupError, print_setup_error

SUBCOMMANDS = {
    "make-tiny-model": (tiny, "write a tiny random Stable Diffusion pipeline (tests, offline smoke runs)"),
    "train": (train, "train a DreamBooth LoRA from photos"),
    "imagine": (imagine, "generate images, optionally with LoRAs"),
    "worker": (worker, "the GPU worker process the bot talks to (JSON lines on stdin/stdout)"),
}


def debug_requested(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get("BOOTHBOT_LOG_LEVEL", "").strip().lower() == "debug"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.add_argument("--debug", action="store_true",
                                help="show the libraries' own warnings and progress bars, and the traceback of a "
                                     "setup problem (also BOOTHBOT_LOG_LEVEL=debug)")
        sub_parser.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except SetupError as error:
        print_setup_error(error, prefix="error: ", debug=debug_requested(args))
        return 2


if __name__ == "__main__":
    sys.exit(main())
