"""Image generation that training needs (class images, previews, samples), on the shared pipeline.

DPM-Solver++ at 25 steps gives SD 1.x images comparable to the default PNDM at 50 in half the time; it is swapped in
for the duration of the call and the pipeline's own scheduler put back afterwards.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

SAMPLER_STEPS = 25
GUIDANCE_SCALE = 7.5


@contextmanager
def dpm_solver(pipe):
    from diffusers import DPMSolverMultistepScheduler

    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def generate(pipe, prompt: str, seeds: list[int], resolution: int, *, steps: int = SAMPLER_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, output_type: str = "pil"):
    """One image per seed (each from its own generator, so an image does not depend on its batch-mates)."""
    import torch

    generators = [torch.Generator(device=pipe.device).manual_seed(int(seed)) for seed in seeds]
    with dpm_solver(pipe), torch.no_grad():
        return pipe(prompt=[prompt] * len(seeds), height=resolution, width=resolution, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generators, output_type=output_type).images


def save_image_atomic(image, path: Path, **save_options) -> Path:
    """PIL image to `path` through a temporary name in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        image.save(tmp, **save_options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
