"""Shared by the training tests: photo sets, a small fast recipe, and a snapshot of the pipeline's state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trainer.contract.train_spec import spec_default
from trainer.training.engine import TrainSpec

# 32 px (16×16 latents on the tiny model) keeps a CPU step around 0.1 s; everything else is the real recipe.
FAST = dict(resolution=32, class_images=2, sample_count=1, rank=4)
CLASS_STEPS = spec_default("class_image_steps")  # sampler steps per class image, a training's and a prefill's


def write_solid_photos(directory: Path, count: int, colour=(230, 20, 200), size: int = 64) -> Path:
    """`count` prepared photos (NNN.png) of one saturated colour, a picture the random model never makes."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(directory / f"{i:03d}.png")
    return directory


def write_noise_photos(directory: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"{i:03d}.png")
    return directory


def make_spec(photos_dir: Path, out_dir: Path, concept_id="c1", **overrides) -> TrainSpec:
    fields = dict(concept_id=concept_id, token="squidarth", class_name="man", photos_dir=photos_dir,
                  out_dir=out_dir, steps=3, seed=7, **FAST)
    fields.update(overrides)
    return TrainSpec(**fields)


def pipeline_state(pipe, extra=()) -> dict:
    """Everything training promises to leave as it found it (`extra`: more components, e.g. SDXL's text_encoder_2)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for name in ("unet", "text_encoder", "vae", *extra):
        model = getattr(pipe, name)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        state[name] = {
            "params": [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
            "training": model.training,
            "peft_config": sorted(getattr(model, "peft_config", {}) or {}),
            "active": [list(layer.active_adapters) for layer in layers],
            "disabled": [layer.disable_adapters for layer in layers],
        }
    state["scheduler"] = type(pipe.scheduler).__name__
    state["unet_channels_last"] = [p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                   for p in pipe.unet.parameters() if p.dim() == 4]
    return state


def generate_latents(pipe, prompt="a photo of squidarth man", seed=0, resolution=32, steps=4):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps, generator=generator,
                output_type="latent").images
