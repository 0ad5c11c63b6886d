"""`python -m trainer ...`: the engine without Discord, for operators, benchmarks and tests.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are imported
only when chosen, so `--help` stays fast and one broken engine does not take the others down. Every subcommand takes
`--debug` (trainer/quiet.py: the libraries' own warnings and progress bars show).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "make-tiny-model": ("trainer.tiny_cli", "write a tiny random Stable Diffusion pipeline (tests, offline smoke runs)"),
    "train": ("trainer.train_cli", "train a DreamBooth LoRA from photos"),
    "imagine": ("trainer.imagine_cli", "generate images, optionally with LoRAs"),
    "worker": ("trainer.worker", "the GPU worker process the bot talks to (JSON lines on stdin/stdout)"),
    "bench": ("trainer.bench", "benchmark ours against the plain diffusers way on the SD 1.5 architecture"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings and "
                                    "progress bars (also BOOTHBOT_LOG_LEVEL=debug)")
            sub_parser.set_defaults(handler=module.run)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
