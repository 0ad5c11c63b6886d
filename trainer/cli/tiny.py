"""`python -m trainer make-tiny-model DIR [--family sd1|sdxl] [--photos DIR]`."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write the pipeline (created if missing)")
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                        help="sd1 (Stable Diffusion 1.x, the default) or sdxl (two text encoders)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--photos", metavar="DIR",
                        help="also write 5 made-up photos there, to try `train` without photos of your own")


def run(args: argparse.Namespace) -> int:
    from trainer.contract.families import family_named
    from trainer.quiet import quiet_libraries
    from trainer.models.tiny import make_tiny_model, write_sample_photos

    quiet_libraries(args.debug)
    path = make_tiny_model(args.directory, seed=args.seed, family=args.family)
    print(f"tiny {family_named(args.family).label} pipeline written to {path}")
    if args.photos:
        print(f"5 made-up photos written to {write_sample_photos(args.photos)}")
    return 0
