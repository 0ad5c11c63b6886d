"""How training trades speed for GPU memory: BOOTHBOT_TRAIN_MEMORY (the worker's --train-memory) = auto | low | fast.

- fast: activations kept for the backward pass, the step replayed from a CUDA graph (the fastest; an SDXL training
  at 1024² needs big GPUs for it beside the resident service).
- low: gradient checkpointing on the trained models: activations recomputed in the backward pass (~30 % more compute
  per step; the step is still replayed from a CUDA graph), so SDXL training and serving fit a 24 GB card
  (docs/TRAINING.md, "Memory").
- auto (the default): low for SDXL on a GPU with less than AUTO_FAST_GIB of memory in all, fast otherwise. SD 1.x
  fits a 12 GB card in the fast setting.

The default recipe's batch follows the GPU too (`default_batch_for`): batch 4 (a twelfth of batch 1's steps, the
learning rates × 12: trainer/training/engine.py `recipe_at_batch`) for SD 1.x on a GPU with BATCH_4_GIB or more in all
(a 24 GB card), unless `low`; batch 1 otherwise (docs/TRAINING.md, "Batch size": the quality yardstick's tables).

Gradient checkpointing computes the same step (only when each activation is computed differently), so the choice
never changes what a recipe means; it is in the checkpoint fingerprint all the same (the rounding may differ), so a
training resumed under another setting starts again.
"""
from __future__ import annotations

MODES = ("auto", "low", "fast")
AUTO_FAST_GIB = 40.0  # measured peaks: docs/TRAINING.md ("Memory"); a 40/48 GB card holds SDXL fast + serving
# SD 1.x at batch 4 beside the resident model peaked at 14.6 GB (docs/TRAINING.md, "Batch size"): 24 GB cards (which
# report 22.5-24 GiB in all) and bigger train at batch 4, 12-16 GB cards at batch 1.
BATCH_4_GIB = 22.0
# Generation's CUDA graphs (and LoRA copies) stay through a training on GPUs this big: an /imagine during the training
# then replays them as before (the compiled forward included) instead of capturing eager ones beside the training.
# Smaller GPUs give them to the training (their pools hold a few GB at SD 1.5's batch shapes; 12-24 GB cards).
KEEP_GENERATION_GIB = 40.0
# The VAE decodes a batch of images in one go on GPUs this big when that needs at most VAE_WHOLE_BATCH_EXTRA_GB more
# than one at a time (8 images at 512² in bf16: 4.06 GB more, 109 vs 167 ms on the H200); image by image otherwise.
VAE_WHOLE_BATCH_GIB = 40.0
VAE_WHOLE_BATCH_EXTRA_GB = 4.5


# What the worker may use of its GPU, in GiB (BOOTHBOT_GPU_MEMORY_GIB, `limit_gpu_memory`); None: all of it.
_limit_gib: float | None = None


def _card_gib(device) -> float:
    import torch

    return torch.cuda.get_device_properties(device).total_memory / 2**30


def total_gib(device) -> float:
    """A CUDA device's memory in all, in GiB, or the limit set for this process if lower (what the auto settings
    compare against)."""
    total = _card_gib(device)
    return total if _limit_gib is None else min(total, _limit_gib)


def limit_gpu_memory(device, gib: float) -> None:
    """Use at most `gib` GiB of `device` from now on, as if the GPU had no more: the auto settings choose as for such
    a card and torch's allocator refuses (out of memory) beyond it. For a GPU shared with other programs, and to
    measure a small card's settings on a big one."""
    import torch

    global _limit_gib
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index  # "cuda": the current one
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib / _card_gib(index)), index)
    _limit_gib = gib


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
    return total_gib(device) < AUTO_FAST_GIB


def keeps_generation_memory(pipe) -> bool:
    """Whether a training on `pipe` leaves generation's graphs and LoRA copies in place (KEEP_GENERATION_GIB)."""
    device = pipe.unet.device
    return device.type == "cuda" and total_gib(device) >= KEEP_GENERATION_GIB


def vae_decodes_whole_batches(vae, images: int, pixels_each: int) -> bool:
    """Whether `vae` decodes `images` images of `pixels_each` pixels in one go rather than image by image: on a GPU of
    VAE_WHOLE_BATCH_GIB or more, when the estimate (0.5 GB per 512² image in 16 bits, twice that in fp32 or for a fp16
    VAE that asks to be upcast, as SDXL's pipeline does) stays within VAE_WHOLE_BATCH_EXTRA_GB."""
    import torch

    device = vae.device
    if device.type != "cuda" or total_gib(device) < VAE_WHOLE_BATCH_GIB:
        return False
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    wide = vae.dtype == torch.float32 or upcast
    extra_gb = images * pixels_each / 512**2 * 0.5 * (2 if wide else 1)
    return extra_gb <= VAE_WHOLE_BATCH_EXTRA_GB


def default_batch_for(mode: str, pipe) -> int:
    """The batch of the default recipe (trainer/training/engine.py `recipe_at_batch`) for a training on `pipe` in
    memory setting `mode`: 4 for SD 1.x on a CUDA GPU with at least BATCH_4_GIB in all unless `low`, else 1. SDXL
    stays at 1: its batch of 4 at 1024² is neither measured for quality nor small."""
    if mode not in MODES:
        raise ValueError(f"unknown training memory setting {mode!r}: one of {', '.join(MODES)}")
    from trainer.models.family import family_of

    device = pipe.unet.device
    if mode == "low" or device.type != "cuda" or family_of(pipe).extra_conditioning:
        return 1
    return 4 if total_gib(device) >= BATCH_4_GIB else 1
