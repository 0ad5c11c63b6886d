"""`python -m bench.soak`: kill -9 the bot or its worker at random while members use it; check nothing is lost."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

from bench.soak.report import summary, table
from bench.soak.run import SoakOptions, run_soak


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0],
                                     epilog="Exit status 1 when any invariant was violated. See docs/RELIABILITY.md.")
    parser.add_argument("--kills", type=int, default=30, help="how many kill -9 (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the choices, not the timing (default 0)")
    parser.add_argument("--members", type=int, default=4, help="members sending commands (default 4)")
    parser.add_argument("--settle-s", type=float, default=300.0,
                        help="after the last kill, how long every job gets to end and be announced (default 300)")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="work in DIR and keep it (the bot's log, data directory, model); default: a temporary "
                             "directory, removed at the end")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = logging.getLogger("bench.soak")
    progress.addHandler(logging.StreamHandler(sys.stderr))
    progress.setLevel(logging.INFO)
    options = SoakOptions(kills=args.kills, seed=args.seed, members=args.members, settle_s=args.settle_s)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run_soak(options, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="boothbot-soak-") as workdir:
            result = asyncio.run(run_soak(options, Path(workdir)))
    print(json.dumps(summary(result), indent=2) if args.json else table(result))
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
