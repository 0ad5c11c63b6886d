"""`python -m trainer imagine "prompt" --out DIR [...]`: generate images without the bot, prints the paths and seed.

A `--lora PATH[:WEIGHT]` file is used as a concept: its token is the `token` in its safetensors header (what the
training engine writes, as `boothbot.token`), else the file name without extension; its class word likewise. If the
prompt doesn't mention the token, the LoRA is still applied (as if `<lora:token:weight>` were in the prompt).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.contract.errors import UserError, require_writable_dir
from trainer.contract.imagine_request import (CFG_RANGE, COUNT_RANGE, DEEP_CACHE_RANGE, DEFAULT_CFG, DEFAULT_COUNT,
                                              DEFAULT_DEEP_CACHE, DEFAULT_STEPS, DEFAULT_STRENGTH, SCHEDULERS,
                                              STEPS_RANGE, ImagineRequest)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the bot's default (bot/settings.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw; concept tokens and <lora:token:weight> tags work as in /imagine")
    parser.add_argument("--out", required=True, help="directory for the images (created if missing)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, diffusers directory or .safetensors checkpoint (default {DEFAULT_MODEL})")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a LoRA file to use, weight 0..2 (default 1); repeat for several")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random, printed)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"{STEPS_RANGE[0]}..{STEPS_RANGE[1]}, default {DEFAULT_STEPS}")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"guidance scale {CFG_RANGE[0]:g}..{CFG_RANGE[1]:g}, default {DEFAULT_CFG:g}")
    parser.add_argument("--size", metavar="WxH", help="image size, multiples of 8 (default: the model's, 512x512 for SD 1.5)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"images {COUNT_RANGE[0]}..{COUNT_RANGE[1]}")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=SCHEDULERS[0], help="sampler (default %(default)s)")
    parser.add_argument("--deep-cache", type=int, default=DEFAULT_DEEP_CACHE, metavar="N",
                        help=f"a whole UNet forward every N-th sampler step, a twelfth of it on the others (the bot's "
                             f"BOOTHBOT_DEEP_CACHE; {DEEP_CACHE_RANGE[0]}: off, up to {DEEP_CACHE_RANGE[1]}; "
                             f"default {DEFAULT_DEEP_CACHE})")
    parser.add_argument("--init-image", help="make variations of this image (img2img)")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                        help=f"how far variations move from --init-image, default {DEFAULT_STRENGTH:g}")
    parser.add_argument("--upload-limit", type=int, help="bytes; also write a smaller WebP copy of PNGs above it")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))


def lora_concept(spec: str) -> dict:
    """`PATH[:WEIGHT]` → an imagine-params concept, token and class word from the file's header when present."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--lora {spec}: no such file")
    meta = _header_metadata(path)
    token = _first(meta, "token") or path.stem
    class_name = _first(meta, "class_name", "class") or ""
    return {"concept_id": None, "token": token, "class_name": class_name, "lora_path": str(path), "weight": weight}


def _header_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _first(meta: dict[str, str], *keys: str) -> str | None:
    for key in keys:
        for name in (key, f"boothbot.{key}"):
            if meta.get(name):
                return meta[name].strip()
    return None


def _size(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text}: write it as WIDTHxHEIGHT, e.g. 512x512") from None
    return width, height


def build_params(args: argparse.Namespace) -> dict:
    concepts = [lora_concept(spec) for spec in args.lora]
    prompt = args.prompt
    probe = ImagineRequest.from_params({"prompt": prompt, "out_dir": args.out, "concepts": concepts})
    mentioned = {use.concept.token for use in probe.parsed.uses}
    for concept in concepts:
        if concept["token"] not in mentioned:
            prompt += f" <lora:{concept['token']}:{concept['weight']:g}>"
    width, height = _size(args.size)
    return {
        "prompt": prompt, "negative": args.negative, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
        "width": width, "height": height, "count": args.count, "scheduler": args.scheduler, "concepts": concepts,
        "out_dir": str(Path(args.out).resolve()), "upload_limit": args.upload_limit,
        "init_image": args.init_image, "strength": args.strength,
    }


def run(args: argparse.Namespace) -> int:
    from trainer.models.loading import load_pipeline, require_model
    from trainer.quiet import quiet_libraries

    quiet_libraries(args.debug)
    try:
        request = ImagineRequest.from_params(build_params(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lo, hi = DEEP_CACHE_RANGE
    if not lo <= args.deep_cache <= hi:
        print(f"error: --deep-cache must be from {lo} to {hi} (1: off), not {args.deep_cache}", file=sys.stderr)
        return 2
    require_model(args.model)  # a wrong --model fails now, not after seconds of importing torch
    require_writable_dir(args.out, "--out")

    from trainer.generation.service import GenerationService
    from trainer.generation.pnginfo import model_hash, model_label
    from trainer.cli.train import ProgressBar

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    service = GenerationService(pipe, model_name=model_label(args.model), model_hash=model_hash(args.model),
                                deep_cache_every=args.deep_cache)
    bar = ProgressBar(sys.stderr)
    started = time.monotonic()
    try:
        result = service.imagine(request, on_progress=bar)
    except UserError as e:
        bar.finish()
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = len(result.images)
    bar.finish(f"{count} image{'' if count == 1 else 's'} in {time.monotonic() - started:.1f} s")
    for path in result.images:
        print(path)
    if result.grid:
        print(result.grid)
    for small in result.small.values():
        print(small)
    for notice in result.notices:
        print(f"note: {notice}")
    print(f"seed: {result.seed}")
    return 0
