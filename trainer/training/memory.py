"""How training trades speed for GPU memory: BOOTHBOT_TRAIN_MEMORY (the worker's --train-memory) = auto | low | fast.

- fast: activations kept for the backward pass, the step replayed from a CUDA graph (the fastest; an SDXL training
  at 1024² needs big GPUs for it beside the resident service).
- low: gradient checkpointing on the trained models: activations recomputed in the backward pass (~30 % more compute
  per step; the step is still replayed from a CUDA graph), so SDXL training and serving fit a 24 GB card
  (docs/TRAINING.md, "Memory").
- auto (the default): low for SDXL on a GPU with less than AUTO_FAST_GIB of memory in all, fast otherwise. SD 1.x
  fits a 12 GB card in the fast setting.

Gradient checkpointing computes the same step (only when each activation is computed differently), so the choice
never changes what a recipe means; it is in the checkpoint fingerprint all the same (the rounding may differ), so a
training resumed under another setting starts again.
"""
from __future__ import annotations

MODES = ("auto", "low", "fast")
AUTO_FAST_GIB = 40.0  # measured peaks: docs/TRAINING.md ("Memory"); a 40/48 GB card holds SDXL fast + serving


def gradient_checkpointing_for(mode: str, pipe) -> bool:
    """Whether a training on `pipe` should use gradient checkpointing in memory setting `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown training memory setting {mode!r}: one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "low"
    from trainer.models.family import family_of

    device = pipe.unet.device
    if device.type != "cuda" or not family_of(pipe).extra_conditioning:
        return False
    import torch

    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return total_gib < AUTO_FAST_GIB
