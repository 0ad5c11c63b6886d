"""The per-server safety switch, as the generation engine applies it.

Admins turn it on or off per server (`/queue admin safety`); every /imagine job carries its server's choice in its
params (`safety`), so the worker decides per job. The base model is loaded without its safety checker (memory for
servers that never use it); the worker loads the model's own checker the first time a job asks for it
(`checker_source`, `load_checker`). A model without one (a single checkpoint file, the tiny test model, a folder
saved without it) cannot run a job with safety on: the job is refused with NO_SAFETY_CHECKER, never run unfiltered.

When a request has safety on:
- the prompt is checked against the server's blocked words (admins edit the list); a hit is a UserError naming the
  word, before any GPU time is spent;
- if the pipeline has a safety checker (diffusers' StableDiffusionSafetyChecker), every image is checked with it
  and flagged images are not saved; their indexes are reported so the member is told which ones were hidden and why.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.contract.errors import UserError
from trainer.contract.prompts import find_blocked_words


def check_prompt(prompt: str, blocked_words) -> None:
    found = find_blocked_words(prompt, blocked_words)
    if found:
        words = ", ".join(f'"{w}"' for w in found)
        raise UserError(f"Your prompt uses {words}, which this server's safety filter blocks.")


def has_checker(pipe) -> bool:
    return getattr(pipe, "safety_checker", None) is not None and getattr(pipe, "feature_extractor", None) is not None


def flag_images(pipe, images: list[Image.Image]) -> list[bool]:
    """True for each image the pipeline's safety checker flags (diffusers' own `run_safety_checker`)."""
    if not images or not has_checker(pipe):
        return [False] * len(images)
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    _, flagged = pipe.run_safety_checker(array, pipe._execution_device, pipe.safety_checker.dtype)
    return [bool(f) for f in (flagged or [False] * len(images))]


def checker_source(model_ref: str | None) -> str | None:
    """Where the base model's own safety checker can be loaded from (its diffusers folder or hub id) when its
    model_index.json names one; None for a single checkpoint file, a hub model not downloaded, or a model without."""
    if not model_ref:
        return None
    path = Path(model_ref).expanduser()
    if path.is_file():
        return None
    if path.is_dir():
        index = path / "model_index.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_ref, "model_index.json")
        if not isinstance(found, str):
            return None
        index = Path(found)
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    named = [components.get(name) for name in ("safety_checker", "feature_extractor")]
    return model_ref if all(isinstance(v, list) and v and v[0] is not None for v in named) else None


def load_checker(pipe, source: str) -> None:
    """Load the checker and its image processor from `source` onto the resident pipeline (downloads them on first use
    for a hub model, as loading the base model would have)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(source, subfolder="safety_checker",
                                                           torch_dtype=pipe.unet.dtype)
    extractor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor")
    pipe.register_modules(safety_checker=checker.to(pipe.device).requires_grad_(False), feature_extractor=extractor)
