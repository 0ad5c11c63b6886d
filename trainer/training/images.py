"""Image generation that training needs (class images, previews, samples), on the shared pipeline.

DPM-Solver++ at 25 steps gives SD 1.x images comparable to the default PNDM at 50 in half the time; it is swapped in
for the duration of the call and the pipeline's own scheduler put back afterwards. On CUDA the UNet steps replay from
CUDA graphs (trainer/generation/fast_unet.py): pass one `unet_graphs()` to several calls of the same shape to capture once.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from pathlib import Path

from trainer.contract.files import write_atomic

SAMPLER_STEPS = 25
GUIDANCE_SCALE = 7.5
SAMPLER_LABEL = "DPM++ 2M"  # A1111's name for what dpm_solver() below makes of SD's scheduler config


@contextmanager
def dpm_solver(pipe):
    from diffusers import DPMSolverMultistepScheduler

    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


@contextmanager
def unet_graphs(pipe):
    """CUDA graphs for the UNet steps of the `generate` calls inside (None off CUDA); freed on exit."""
    from trainer.generation.fast_unet import UNetGraphs

    if not UNetGraphs.usable(pipe.unet):
        yield None
        return
    graphs = UNetGraphs(pipe.unet, max_graphs=2)
    try:
        yield graphs
    finally:
        free_graphs(graphs)


def free_graphs(graphs) -> None:
    """Drop the captured graphs of a `unet_graphs()` (None: nothing to do) and give their pool back; they are
    captured again if used afterwards."""
    if graphs is None or not graphs.captures:
        return
    graphs.clear()
    import torch

    torch.cuda.empty_cache()  # the graphs' pool, back for the training that follows


def generate(pipe, prompt: str, seeds: list[int], resolution: int, *, steps: int = SAMPLER_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, output_type: str = "pil", graphs=None):
    """One image per seed (each from its own generator, so an image does not depend on its batch-mates, up to the
    float rounding of the batch size). `graphs`: from `unet_graphs(pipe)`; by default this call makes its own."""
    import torch

    from trainer.generation.service import vae_one_image_at_a_time

    generators = [torch.Generator(device=pipe.device).manual_seed(int(seed)) for seed in seeds]
    with contextlib.ExitStack() as stack:
        if graphs is None:
            graphs = stack.enter_context(unet_graphs(pipe))
        if graphs is not None:
            stack.enter_context(graphs.installed())
        stack.enter_context(dpm_solver(pipe))
        stack.enter_context(vae_one_image_at_a_time(pipe.vae, len(seeds)))  # 8 images at once: +4 GB at 512²
        stack.enter_context(torch.no_grad())
        return pipe(prompt=[prompt] * len(seeds), height=resolution, width=resolution, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generators, output_type=output_type).images


def save_image_atomic(image, path: Path, **save_options) -> Path:
    """PIL image to `path` through a temporary name in the same directory, in the format `path`'s suffix names."""
    from PIL import Image

    image_format = Image.registered_extensions()[Path(path).suffix.lower()]
    return write_atomic(path, lambda tmp: image.save(tmp, format=image_format, **save_options))
