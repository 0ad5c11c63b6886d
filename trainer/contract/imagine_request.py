"""ImagineRequest: the worker's `imagine` params, checked and given defaults. Pure Python (no torch).

The bot may call `ImagineRequest.from_params(params)` at submit time to reject bad options and tokens early; the
worker calls it again. What depends on the loaded model (the allowed image size) is `check_size`, called by
GenerationService with the model's native side and by the bot at submit with the one the worker reported as ready.

Re-roll = the same params with a new `seed` (or none: a random one is drawn and reported). Variations of one image =
the same params plus `init_image` (the image's path) and `strength` (how far to move from it; img2img).
`size` names a picture shape (trainer/contract/aspects.py) for the engine to turn into its family's size, when the bot
could not do it at submit (no worker had been ready yet); width and height, when given, win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.contract.aspects import ASPECTS, aspect_sizes, label
from trainer.contract.errors import UserError
from trainer.contract.families import SD1, Family
from trainer.contract.prompts import ConceptSpec, ParsedPrompt, check_negative_prompt, number_in_range, parse_prompt

SCHEDULERS = ("dpmpp_2m_karras", "euler_a", "ddim")
SEED_MAX = 2**32 - 1
# 20 sampler steps by default, A1111's and ComfyUI's own default: the quality yardstick's world model follows prompts
# as well at 20 as at 25 and 30 (`python -m bench.quality check --count 256 --steps N`, docs/BENCHMARKS.md), and every
# /imagine is a third faster than at 30. Members who want more ask for it (steps:).
STEPS_RANGE, DEFAULT_STEPS = (1, 100), 20
CFG_RANGE, DEFAULT_CFG = (1.0, 20.0), 7.0
# The deep cache (trainer/generation/deep_cache.py): a whole UNet forward on every n-th sampler step, its head on the
# others; 1 is off. An operator's setting (BOOTHBOT_DEEP_CACHE), not a member's option. Every third step: the quality
# yardstick read its pictures like those without it at 20 and 30 steps (docs/BENCHMARKS.md, session 18).
DEEP_CACHE_RANGE, DEFAULT_DEEP_CACHE = (1, 10), 3
COUNT_RANGE, DEFAULT_COUNT = (1, 4), 1
STRENGTH_RANGE, DEFAULT_STRENGTH = (0.05, 1.0), 0.6
SIDE_RANGE = (64, 2048)  # absolute bounds; the model narrows them (see size_range)
NO_SAFETY_CHECKER = ("The safety filter is on for this server, but the bot's base model has no safety checker to "
                     "check images with, so /imagine can't run here. An admin can turn the filter off with "
                     "`/queue admin safety state:off`, or the bot's operator can use a base model that includes one.")
# What /imagine lets a member type in the prompt and the negative prompt (the engine takes up to MAX_PROMPT_CHARS).
MEMBER_PROMPT_CHARS = 1000


def check_deep_cache(every) -> int:
    lo, hi = DEEP_CACHE_RANGE
    if isinstance(every, bool) or not isinstance(every, int) or not lo <= every <= hi:
        raise ValueError(f"the deep cache's interval must be a whole number from {lo} to {hi} (1: off), not {every!r}")
    return every


def _int_option(params: dict, key: str, label: str, lo: int, hi: int, default: int | None) -> int | None:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
        if value != float(raw):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a whole number from {lo} to {hi} (got {raw!r}).") from None
    if not lo <= value <= hi:
        raise UserError(f"{label} must be from {lo} to {hi} (got {value}).")
    return value


def _float_option(params: dict, key: str, label: str, lo: float, hi: float, default: float) -> float:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    return number_in_range(raw, label, lo, hi)


def check_side(value: int | None, label: str, lo: int, hi: int) -> int | None:
    if value is not None and value % 8:
        raise UserError(f"{label} must be a multiple of 8 from {lo} to {hi} (got {value}; try {max(lo, value // 8 * 8)}).")
    return value


def size_range(native_side: int) -> tuple[int, int]:
    """The sides a model makes well: half to twice its training resolution (native side), at least 64 px."""
    return max(SIDE_RANGE[0], native_side // 2), min(SIDE_RANGE[1], native_side * 2)


def check_size(width: int | None, height: int | None, native_side: int, family: Family = SD1) -> tuple[int, int]:
    """(width, height) with None as the native side; UserError listing what this model allows otherwise (and which
    of its family's offered sizes fit)."""
    lo, hi = size_range(native_side)
    width, height = width or native_side, height or native_side
    if lo <= width <= hi and lo <= height <= hi:
        return width, height
    fitting = [f"{label(name)} {w}×{h}" for name, (w, h) in aspect_sizes(family).items()
               if lo <= w <= hi and lo <= h <= hi]
    offered = (f"Of the offered sizes these fit: {', '.join(fitting)}." if fitting else
               f"None of the offered sizes fits; leave size empty for the model's own {native_side}×{native_side}.")
    raise UserError(f"{width}×{height} is not a size this model can make: the width and the height must be multiples "
                    f"of 8 from {lo} to {hi} px. {offered}")


@dataclass(frozen=True)
class ImagineRequest:
    prompt: str
    out_dir: Path
    negative: str = ""
    seed: int | None = None             # None: drawn at random by the service and reported
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    width: int | None = None            # None: the model's native size (512 for SD 1.5)
    height: int | None = None
    count: int = DEFAULT_COUNT
    scheduler: str = SCHEDULERS[0]
    concepts: tuple[ConceptSpec, ...] = ()
    upload_limit: int | None = None     # bytes; a PNG above it gets a re-encoded copy under it
    safety: bool = False
    blocked_words: tuple[str, ...] = ()
    init_image: Path | None = None      # img2img: the image to make variations of
    strength: float = DEFAULT_STRENGTH
    job_id: int | str | None = None     # written into the PNG's parameters
    preview_path: Path | None = None    # where progress previews go; default <out_dir>/preview.webp
    size: str | None = None             # a shape name (trainer/contract/aspects.py) used when width/height are None
    parsed: ParsedPrompt = field(default=None, compare=False)  # filled by __post_init__

    def __post_init__(self):
        if self.parsed is None:
            object.__setattr__(self, "parsed", parse_prompt(self.prompt, self.concepts))

    @classmethod
    def from_params(cls, params: dict) -> "ImagineRequest":
        """Check the worker's `imagine` params; UserError names the option and its allowed range."""
        if not params.get("out_dir"):
            raise ValueError("imagine params need out_dir")
        lo, hi = SIDE_RANGE
        scheduler = str(params.get("scheduler") or SCHEDULERS[0]).strip().lower()
        if scheduler not in SCHEDULERS:
            raise UserError(f"Unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
        upload_limit = params.get("upload_limit")
        init_image = params.get("init_image")
        preview_path = params.get("preview_path")
        size = params.get("size") or None
        if size is not None and size not in ASPECTS:
            raise UserError(f"Unknown picture shape {size!r}; choose one of: {', '.join(map(label, ASPECTS))}.")
        return cls(
            prompt=str(params.get("prompt") or ""),
            out_dir=Path(params["out_dir"]),
            negative=check_negative_prompt(str(params.get("negative") or "")),
            seed=_int_option(params, "seed", "The seed", 0, SEED_MAX, None),
            steps=_int_option(params, "steps", "Steps", *STEPS_RANGE, DEFAULT_STEPS),
            cfg=_float_option(params, "cfg", "The guidance scale (cfg)", *CFG_RANGE, DEFAULT_CFG),
            width=check_side(_int_option(params, "width", "The width", lo, hi, None), "The width", lo, hi),
            height=check_side(_int_option(params, "height", "The height", lo, hi, None), "The height", lo, hi),
            count=_int_option(params, "count", "The number of images", *COUNT_RANGE, DEFAULT_COUNT),
            scheduler=scheduler,
            concepts=tuple(ConceptSpec.from_dict(c) for c in params.get("concepts") or ()),
            upload_limit=int(upload_limit) if upload_limit else None,
            safety=bool(params.get("safety", False)),
            blocked_words=tuple(str(w) for w in params.get("blocked_words") or ()),
            init_image=Path(init_image) if init_image else None,
            strength=_float_option(params, "strength", "The variation strength", *STRENGTH_RANGE, DEFAULT_STRENGTH),
            job_id=params.get("job_id"),
            preview_path=Path(preview_path) if preview_path else None,
            size=size,
        )
