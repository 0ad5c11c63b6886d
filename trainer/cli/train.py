"""`python -m trainer train --photos DIR|ZIP --token squidarth --class man --out DIR`: one training, in the terminal.

It runs the photo intake first and prints its report (accepted, rejected with reasons, warnings); when nothing usable
is left it stops there with a non-zero exit. Then it loads the base model, trains (a progress bar per stage on stderr)
and prints how long training took (the seconds in the LoRA's metadata; loading the model is not counted) and where
the LoRA files and sample images are. Prepared photos go to OUT/photos, the LoRA to OUT/, class images to the shared
cache (default: $BOOTHBOT_DATA_DIR/cache, else ./data/cache) so later trainings reuse them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

from trainer.contract.durations import format_duration
from trainer.contract.train_spec import TRAIN_OPTIONS, TrainSpec

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the bot's default (bot/settings.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", required=True, help="a folder of photos or a .zip of them")
    parser.add_argument("--token", required=True, help="the new word for the subject, e.g. squidarth")
    parser.add_argument("--class", dest="class_name", required=True, help="what it is: man, woman, dog, style, …")
    parser.add_argument("--out", required=True, help="output folder (created): lora.safetensors, samples/, …")
    parser.add_argument("--model", default=os.environ.get("BOOTHBOT_MODEL", DEFAULT_MODEL),
                        help="base model: hub id, diffusers folder or .safetensors file (default: %(default)s)")
    parser.add_argument("--device", default=os.environ.get("BOOTHBOT_DEVICE", "auto"), help="auto, cuda, cpu, …")
    parser.add_argument("--dtype", default=os.environ.get("BOOTHBOT_DTYPE", "auto"), choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--cache-dir", default=None, help="shared cache for class images")
    add_spec_arguments(parser)


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainSpec field with a `cli` flag; the parsed value lands under the field's name."""
    types = typing.get_type_hints(TrainSpec)
    for spec_field in dataclasses.fields(TrainSpec):
        rules = TRAIN_OPTIONS[spec_field.name]
        if rules.cli is None:
            continue
        kind = _value_type(types[spec_field.name])
        kwargs = {"dest": spec_field.name, "default": spec_field.default, "help": rules.help or argparse.SUPPRESS}
        if kind is bool:
            # A switch that is off unless given (--style); otherwise --flag / --no-flag (--text-encoder, --prior).
            kwargs["action"] = "store_true" if spec_field.default is False else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        parser.add_argument(rules.cli, **kwargs)


def _value_type(annotation) -> type:
    """int for `int | None`, and so on."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    return kinds[0]


def run(args: argparse.Namespace) -> int:
    from trainer.contract.errors import UserError, require_writable_dir
    from trainer.models.loading import require_model
    from trainer.quiet import quiet_libraries

    quiet_libraries(args.debug)
    require_model(args.model)  # a wrong --model fails now, not after the photo intake
    out_dir = require_writable_dir(args.out, "--out")
    cache_dir, setting = _cache_dir(args)
    if args.prior_preservation is not False:
        cache_dir = require_writable_dir(cache_dir, setting)
    try:
        photos_dir, token, class_name = _intake(args, out_dir / "photos")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if photos_dir is None:
        return 1
    try:
        outcome = _train(args, photos_dir, token, class_name, out_dir, cache_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if outcome.status != "done":
        print(f"training {outcome.status} at step {outcome.step}/{outcome.total}", file=sys.stderr)
        return 1
    result = outcome.result
    took = f"trained in {result['seconds']:.1f} s ({result['steps']} steps)"  # the seconds in the LoRA's metadata
    if result["samples"]:
        took += f", then {len(result['samples'])} samples in {result['timings']['samples']:.1f} s"
    print(took)
    print(f"LoRA (diffusers):      {result['lora']}")
    print(f"LoRA (A1111/ComfyUI):  {result['lora_kohya']}")
    for sample in result["samples"]:
        print(f"sample:                {sample}")
    return 0


def _intake(args, photos_dir: Path):
    """Check the token and class, run the photo intake and print its report.

    Returns (prepared photos dir, token, class), with None for the directory when nothing usable is left.
    """
    from trainer.intake.photos import IntakeLimits, intake_photos, normalise_class
    from trainer.intake.tokens import check_token, model_vocab

    token, class_name = check_token(args.token, model_vocab(args.model)), normalise_class(args.class_name)
    limits = IntakeLimits(resolution=_photo_side(args))
    report = intake_photos([Path(args.photos)], photos_dir, limits=limits, class_name=class_name, style=args.style)
    print(report.summary())
    if not report.ok:
        print("error: not enough usable photos, nothing was trained", file=sys.stderr)
        return None, token, class_name
    return photos_dir, token, class_name


def _photo_side(args) -> int:
    """The side photos are prepared at: --resolution, else the model family's own (1024 for SDXL); at least 512."""
    from trainer.contract.errors import SetupError
    from trainer.models.detection import detect_family
    from trainer.models.loading import resolve_model

    if args.resolution:
        return max(512, args.resolution)
    try:
        return max(512, detect_family(resolve_model(args.model)).native_side)
    except SetupError:
        return 512  # loading the model next says what is wrong with it


def _train(args, photos_dir: Path, token: str, class_name: str, out_dir: Path, cache_dir: Path):
    from trainer.intake.tokens import check_token
    from trainer.models.loading import load_pipeline
    from trainer.training.engine import train_concept

    options = {name: getattr(args, name) for name, rules in TRAIN_OPTIONS.items() if rules.cli}
    spec = TrainSpec(concept_id="cli", token=token, class_name=class_name, photos_dir=photos_dir, out_dir=out_dir,
                     base_model=args.model, **options)
    spec.validate()
    print(f"loading {args.model} …", flush=True)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    print(f"on {pipe.device} in {pipe.unet.dtype}", flush=True)
    check_token(token, pipe.tokenizer)  # a hub model's tokenizer is only at hand now
    bar = ProgressBar(sys.stderr)
    try:
        while True:
            outcome = train_concept(pipe, spec, cache_dir=cache_dir, on_progress=bar)
            if outcome.status != "paused":
                return outcome
    finally:
        bar.finish()


def _cache_dir(args) -> tuple[Path, str]:
    """The class-image cache and the setting that chose it (for messages)."""
    if args.cache_dir:
        return Path(args.cache_dir), "--cache-dir"
    return Path(os.environ.get("BOOTHBOT_DATA_DIR", "data")) / "cache", "BOOTHBOT_DATA_DIR"


class ProgressBar:
    """One line per stage, redrawn in place: `[#####-----] 120/800  loss 0.1234  ETA 1 min`.

    Takes training and generation progress alike. A new stage (class images, training, samples) starts a new line,
    so each stage's last state stays on screen; a stage without a bar of its own ("samples") shows its detail.
    """

    LABELS = {None: "", "training": "", "class_images": "class images "}

    def __init__(self, stream, width: int = 30):
        self.stream, self.width = stream, width
        self._last, self._stage, self._drawn = 0.0, None, False

    def __call__(self, info) -> None:
        stage, now = getattr(info, "stage", None), time.monotonic()
        if self._drawn and stage == self._stage and info.step not in (1, info.total) and now - self._last < 0.2:
            return
        if self._drawn and stage != self._stage:
            self.stream.write("\n")
        self._last, self._stage = now, stage
        self._draw(self._line(info))

    def _line(self, info) -> str:
        stage = getattr(info, "stage", None)
        if stage not in self.LABELS:
            return info.detail or stage
        filled = int(self.width * info.step / max(info.total, 1))
        line = f"{self.LABELS[stage]}[{'#' * filled}{'-' * (self.width - filled)}] {info.step}/{info.total}"
        if info.loss is not None:
            line += f"  loss {info.loss:.4f}"
        if info.eta_s is not None:
            line += f"  ETA {format_duration(info.eta_s)}"
        return line

    def finish(self, summary: str | None = None) -> None:
        """End the line, replacing the bar with `summary` when given."""
        if summary is not None:
            self._draw(summary)
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(72))
        self.stream.flush()
        self._drawn = True
