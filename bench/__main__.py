"""`python -m bench`: ours against the plain diffusers way on the SD 1.5 architecture (options: --help);
`python -m bench --family sdxl ...`: SDXL training against diffusers' SDXL script's way (bench/sdxl_train.py)."""
from __future__ import annotations

import argparse
import sys

from bench.run import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    chosen, rest = family.parse_known_args(argv)
    if chosen.family == "sdxl":
        from bench.sdxl_train import main as sdxl_main

        return sdxl_main(rest)
    argv = rest
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                        help="sdxl: the SDXL training benchmark instead (python -m bench --family sdxl --help)")
    parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings and progress bars")
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
