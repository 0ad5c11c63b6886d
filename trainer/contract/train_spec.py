"""TrainSpec: what to train (the worker's `train` params and the recipe), each field declared with its rules.

Pure Python, so the bot reads it at submit time. Every field is declared with `option(...)`, which says what the
other places need to know about it; they read it from here instead of keeping their own lists:
- `fingerprint` (required): whether the field changes what is trained. The checkpoint fingerprint covers exactly these
  fields, so a checkpoint or a finished training is reused only when all of them are the same.
- `range` (+ `label`, `when`): the values the engine accepts; TrainSpec.validate checks them.
- `members` / `member_range`: a member may set it through /train, within `member_range` (default: `range`).
- `cli` (+ `help`): its flag in `python -m trainer train`; no help hides the flag from --help.
- `lora`: recorded in the LoRA file's metadata (the engine records the effective value where one is derived).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from trainer.contract.errors import UserError
from trainer.contract.imagine_request import DEEP_CACHE_RANGE, DEFAULT_DEEP_CACHE
from trainer.contract.naming import class_kind
from trainer.contract.naming import instance_prompt as naming_instance_prompt


@dataclass(frozen=True)
class Range:
    """Allowed numbers: from `low` to `high` (inclusive; None: unbounded); `above`: `low` itself is not allowed."""

    low: float | None = None
    high: float | None = None
    above: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def rule(self) -> str:
        """The rule as the end of a sentence: "must be between 1 and 256", "cannot be negative", …"""
        low, high = self.low, self.high
        if low is not None and high is not None:
            start = f"above {low:g} and at most" if self.above else f"between {low:g} and"
            return f"must be {start} {high:g}"
        if low == 0:
            return "must be positive" if self.above else "cannot be negative"
        if low is not None:
            return f"must be above {low:g}" if self.above else f"must be at least {low:g}"
        return f"must be at most {high:g}"


@dataclass(frozen=True)
class Option:
    """The rules of one TrainSpec field (see the module docstring)."""

    fingerprint: bool
    help: str = ""
    label: str = ""
    range: Range | None = None
    when: Callable[[TrainSpec], bool] | None = None  # check the range only when this holds
    members: bool = False
    member_range: Range | None = None
    cli: str | None = None
    lora: bool = False

    @property
    def for_members(self) -> Range | None:
        """The values a member may pick (for a field members may set)."""
        return self.member_range or self.range


def option(default=dataclasses.MISSING, *, fingerprint: bool, **rules) -> dataclasses.Field:
    """A TrainSpec field with its rules. `fingerprint` has no default: every new field must decide it."""
    return dataclasses.field(default=default, metadata={"option": Option(fingerprint, **rules)})


@dataclass
class TrainSpec:
    """What to train. The first ten fields are the worker's `train` params; the rest is the recipe (docs/TRAINING.md)."""

    concept_id: str = option(fingerprint=True)
    token: str = option(fingerprint=True, lora=True)
    class_name: str = option(fingerprint=True, lora=True)
    photos_dir: Path = option(fingerprint=False)  # the photos themselves are in the fingerprint (their digest)
    out_dir: Path = option(fingerprint=False)
    style: bool = option(False, fingerprint=True, lora=True, members=True, cli="--style",
                         help="the photos show a style, not a subject")
    steps: int | None = option(None, fingerprint=True, lora=True, cli="--steps",
                               help="training steps (default: from the photo count)", label="steps",
                               range=Range(1, 20_000), members=True,
                               member_range=Range(1, 3000))  # a member's training must not hold the shared GPU long
    seed: int = option(0, fingerprint=True, lora=True, cli="--seed", help="random seed (default: %(default)s)")
    # None or 0: no time limit. The CLI flag has no help: it is hidden, for trying slices by hand.
    slice_s: float | None = option(None, fingerprint=False, cli="--slice-s")
    train_text_encoder: bool = option(True, fingerprint=True, lora=True, cli="--text-encoder",
                                      help="also train a text-encoder LoRA (default: on)")
    rank: int = option(16, fingerprint=True, lora=True, cli="--rank", help="LoRA rank (default: %(default)s)",
                       label="rank", range=Range(1, 256))
    learning_rate: float = option(1e-4, fingerprint=True, lora=True, cli="--lr",
                                  help="UNet learning rate (default: %(default)s)",
                                  label="the learning rate", range=Range(0, 1e-2, above=True))
    text_encoder_learning_rate: float = option(5e-5, fingerprint=True, lora=True,
                                               label="the text encoder learning rate",
                                               range=Range(0, 1e-2, above=True))
    batch_size: int = option(1, fingerprint=True, lora=True, cli="--batch-size", help="default: %(default)s",
                             label="the batch size", range=Range(1, 64))
    resolution: int | None = option(None, fingerprint=True, lora=True, cli="--resolution",
                                    help="default: the model's own (512 for SD 1.5)")
    prior_preservation: bool | None = option(None, fingerprint=True, lora=True, cli="--prior",
                                             help="prior preservation: also train on generated images of the class "
                                                  "(default: on, except for styles)")
    class_images: int = option(48, fingerprint=True, lora=True, cli="--class-images",
                               help="prior-preservation images of the class (default: %(default)s)",
                               label="class images", range=Range(1, 2000), when=lambda spec: spec.uses_prior)
    # DPM-Solver++ steps per class image (trainer/training/images.py SAMPLER_STEPS is /imagine's)
    class_image_steps: int = option(10, fingerprint=True, lora=True, cli="--class-image-steps",
                                    help="sampler steps per class image (default: %(default)s)",
                                    label="class image sampler steps", range=Range(1, 150),
                                    when=lambda spec: spec.uses_prior)
    prior_loss_weight: float = option(1.0, fingerprint=True, label="the prior loss weight", range=Range(0))
    snr_gamma: float | None = option(5.0, fingerprint=True, label="snr_gamma", range=Range(0, above=True))
    flip: bool = option(False, fingerprint=True)
    max_grad_norm: float = option(1.0, fingerprint=True)
    gradient_checkpointing: bool = option(False, fingerprint=True)
    # torch's deterministic kernels while training (bit-identical reruns on one GPU)
    deterministic: bool = option(True, fingerprint=True)
    # replay the step from a CUDA graph on CUDA (same math, far fewer launches)
    cuda_graphs: bool = option(True, fingerprint=False)
    sample_count: int = option(4, fingerprint=False, label="sample count", range=Range(0, 16))
    # the samples' deep cache, as /imagine's (the worker's --deep-cache; 1: off): they show what /imagine will make
    sample_deep_cache: int = option(DEFAULT_DEEP_CACHE, fingerprint=False, label="the samples' deep cache",
                                    range=Range(*DEEP_CACHE_RANGE))
    # steps between previews; None: a fifth of the steps when preview_path is set
    preview_every: int | None = option(None, fingerprint=False, label="preview_every", range=Range(0))
    # where previews go (WebP); None and preview_every unset: no previews
    preview_path: Path | None = option(None, fingerprint=False)
    # the name recorded in the LoRA's metadata; default: the pipeline's name_or_path
    base_model: str | None = option(None, fingerprint=False)

    def __post_init__(self):
        self.concept_id = str(self.concept_id)
        self.photos_dir = Path(self.photos_dir)
        self.out_dir = Path(self.out_dir)
        if self.preview_path is not None:
            self.preview_path = Path(self.preview_path)

    @classmethod
    def from_params(cls, params: dict) -> "TrainSpec":
        """The worker's `train` params (docs/ARCHITECTURE.md); recipe fields may be given too; other keys ignored."""
        missing = [n for n in ("concept_id", "token", "class_name", "photos_dir", "out_dir") if params.get(n) is None]
        if missing:
            raise ValueError(f"train params lack {', '.join(missing)}")
        values = {key: value for key, value in params.items() if key in TRAIN_OPTIONS and value is not None}
        return cls(**values)

    @property
    def is_style(self) -> bool:
        return self.style or class_kind(self.class_name) == "style"

    @property
    def instance_prompt(self) -> str:
        return naming_instance_prompt(self.token, self.class_name, "style" if self.is_style else None)

    @property
    def uses_prior(self) -> bool:
        return (not self.is_style) if self.prior_preservation is None else self.prior_preservation

    def preview_interval(self, total: int) -> int:
        if self.preview_every is not None:
            return self.preview_every
        return math.ceil(total / 5) if self.preview_path is not None else 0

    @property
    def preview_file(self) -> Path:
        return self.preview_path or self.out_dir / "preview.webp"

    @property
    def adapter_name(self) -> str:
        return "boothbot_train_" + re.sub(r"[^A-Za-z0-9_]", "_", self.concept_id)

    def fingerprint_fields(self) -> dict:
        """The fields that change what is trained (the checkpoint fingerprint's share of the spec)."""
        return {name: getattr(self, name) for name, rules in TRAIN_OPTIONS.items() if rules.fingerprint}

    def lora_fields(self) -> dict:
        """The fields the LoRA file's metadata records, as given (the engine replaces derived ones)."""
        return {name: getattr(self, name) for name, rules in TRAIN_OPTIONS.items() if rules.lora}

    def validate(self) -> None:
        if not self.token.strip() or any(c.isspace() for c in self.token):
            raise UserError("Training settings: the token must be one word.")
        for name, rules in TRAIN_OPTIONS.items():
            value = getattr(self, name)
            if rules.range is None or value is None or (rules.when is not None and not rules.when(self)):
                continue
            if value not in rules.range:
                raise UserError(f"Training settings: {rules.label or name} {rules.range.rule()}.")


def spec_default(name: str):
    """The value a TrainSpec field `name` has when a job does not set it."""
    return next(f.default for f in dataclasses.fields(TrainSpec) if f.name == name)


def options_of(spec_class: type) -> dict[str, Option]:
    """Field name -> its rules, in declaration order; TypeError for a field declared without option(...)."""
    table = {}
    for spec_field in dataclasses.fields(spec_class):
        if "option" not in spec_field.metadata:
            raise TypeError(f"{spec_class.__name__}.{spec_field.name} must be declared with option(...): decide at "
                            "least whether it is part of the checkpoint fingerprint")
        table[spec_field.name] = spec_field.metadata["option"]
    return table


TRAIN_OPTIONS = options_of(TrainSpec)
MEMBER_OPTIONS = {name: rules for name, rules in TRAIN_OPTIONS.items() if rules.members}


def checked_params(values: Mapping[str, object], *, by_member: bool = False) -> dict:
    """TrainSpec fields for a job's params, with None left out, each checked against its range now (at submit) rather
    than when the training starts. A member's values are checked against what members may pick; a field that is not a
    TrainSpec field, or (for members) not one they may set, is a bug: ValueError."""
    params = {}
    for name, value in values.items():
        rules = (MEMBER_OPTIONS if by_member else TRAIN_OPTIONS).get(name)
        if rules is None:
            raise ValueError(f"{name!r} is not a training option{' members may set' if by_member else ''}")
        if value is None:
            continue
        allowed = rules.for_members if by_member else rules.range
        if allowed is not None and value not in allowed:
            raise UserError(f"Training settings: {rules.label or name} {allowed.rule()}.")
        params[name] = value
    return params
