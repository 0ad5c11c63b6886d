"""The per-server safety switch, as the generation engine applies it.

When a request has safety on:
- the prompt is checked against the server's blocked words (admins edit the list); a hit is a UserError naming the
  word, before any GPU time is spent;
- if the pipeline has a safety checker (diffusers' StableDiffusionSafetyChecker), every image is checked with it
  and flagged images are not saved; their indexes are reported so the member is told which ones were hidden and why.
"""
from __future__ import annotations

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
