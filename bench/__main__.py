"""`python -m bench`: ours against the plain diffusers way on the SD 1.5 architecture (options: --help)."""
from __future__ import annotations

import argparse
import sys

from bench.run import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings and progress bars")
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
