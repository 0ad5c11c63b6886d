"""`python -m bench`: ours against the plain diffusers way on the SD 1.5 architecture (options: --help);
`python -m bench --family sdxl ...`: SDXL training against diffusers' SDXL script's way (bench/sdxl_train.py);
`python -m bench --family sdxl --only imagine,throughput,switch`: SDXL /imagine against the plain SDXL pipeline
(bench/run.py, like SD 1.5's)."""
from __future__ import annotations

import argparse
import sys

from bench.run import FAMILY_SECTIONS, add_arguments, run


def _sdxl_serving(only: str | None) -> bool:
    """Whether an SDXL run asks only for the /imagine sections bench/run.py measures."""
    sections = [s.strip() for s in (only or "").split(",") if s.strip()]
    return bool(sections) and set(sections) <= set(FAMILY_SECTIONS["sdxl"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    family.add_argument("--only", default=None)
    chosen, rest = family.parse_known_args(argv)
    if chosen.family == "sdxl" and not _sdxl_serving(chosen.only):
        from bench.sdxl_train import main as sdxl_main

        return sdxl_main(rest + (["--only", chosen.only] if chosen.only else []))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings and progress bars")
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
