"""Image generation that training needs (class images, previews, samples), on the shared pipeline.

DPM-Solver++ at 20 steps (/imagine's default too) gives SD 1.x images comparable to the default PNDM at 50; it is swapped in
for the duration of the call and the pipeline's own scheduler put back afterwards. On CUDA the UNet steps replay from
CUDA graphs (trainer/generation/fast_unet.py): pass one `unet_graphs()` to several calls of the same shape to capture once.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer.contract.files import write_atomic

# /imagine's sampler read alike at 20, 25 and 30 steps on the world model (docs/BENCHMARKS.md, session 13); samples
# and previews use it too. Class images have their own count (TrainSpec.class_image_steps: 10, docs/TRAINING.md)
SAMPLER_STEPS = 20
GUIDANCE_SCALE = 7.5
SAMPLER_LABEL = "DPM++ 2M"  # A1111's name for DPM-Solver++ made from SD's scheduler config, as below


def new_unet_graphs(pipe):
    """CUDA graphs for the UNet steps of `generate` calls (None off CUDA); the caller frees them (`free_graphs`)."""
    from trainer.generation.fast_unet import UNetGraphs

    return UNetGraphs(pipe.unet, max_graphs=2) if UNetGraphs.usable(pipe.unet) else None


@contextmanager
def unet_graphs(pipe):
    """`new_unet_graphs` for the `generate` calls inside; freed on exit."""
    graphs = new_unet_graphs(pipe)
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
             guidance_scale: float = GUIDANCE_SCALE, output_type: str = "pil", graphs=None, deep_cache_every: int = 1):
    """One image per seed (each from its own generator, so an image does not depend on its batch-mates, up to the
    float rounding of the batch size). `graphs`: from `unet_graphs(pipe)`; by default this call makes its own.
    `deep_cache_every`: `generate_pausable`'s."""
    return generate_pausable(pipe, prompt, seeds, resolution, steps=steps, guidance_scale=guidance_scale,
                             output_type=output_type, graphs=graphs, deep_cache_every=deep_cache_every)


@dataclass
class PausedBatch:
    """A batch stopped between two sampler steps: its latents and its sampler as they were then. DPM-Solver++ draws no
    noise after the first latents, so going on from here gives exactly the images of an uninterrupted batch."""
    prompt: str
    seeds: tuple[int, ...]
    resolution: int
    latents: object  # torch.Tensor
    scheduler: object  # the DPMSolverMultistepScheduler, with its step index and the model outputs it keeps
    steps_done: int
    steps: int
    reuse: object  # the deep cache's Reuse (trainer/generation/deep_cache.py): where it stands, its kept feature


class _Paused(Exception):
    def __init__(self, batch: PausedBatch):
        self.batch = batch


class _GoOn:
    """A paused batch's scheduler as the pipeline sees it when the batch goes on: `set_timesteps` keeps its state and
    `timesteps` lists only the steps still to run (its own `step` still sees the whole schedule)."""

    def __init__(self, scheduler, steps_done: int):
        self._scheduler, self._steps_done = scheduler, steps_done

    def set_timesteps(self, *args, **kwargs) -> None:
        pass

    def set_begin_index(self, begin_index: int = 0) -> None:
        pass

    @property
    def timesteps(self):
        return self._scheduler.timesteps[self._steps_done:]

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def generate_pausable(pipe, prompt: str, seeds: list[int], resolution: int, *, steps: int = SAMPLER_STEPS,
                      guidance_scale: float = GUIDANCE_SCALE, output_type: str = "pil", graphs=None,
                      should_pause: Callable[[], bool] | None = None, paused: PausedBatch | None = None,
                      deep_cache_every: int = 1):
    """`generate`, which `should_pause()` (asked after each sampler step) can stop between two steps or before the
    VAE decode: then it returns a PausedBatch instead of the images, and passing that back as `paused` goes on where
    it stopped. A call makes at least one step (or, once every step is made, the decode), so a batch asked to pause
    at every step still finishes. `deep_cache_every`: as /imagine's (trainer/generation/deep_cache.py; 1: off); a
    paused batch keeps the deep feature, so that going on still gives the uninterrupted batch's images."""
    import torch

    from diffusers import DPMSolverMultistepScheduler

    from trainer.generation.deep_cache import Reuse, reusing
    from trainer.generation.service import vae_batch_decoding
    from trainer.training.step import StepsInFlight

    if paused is not None and (paused.prompt, paused.seeds, paused.resolution, paused.steps) != (
            prompt, tuple(seeds), resolution, steps):
        raise ValueError("the paused batch is another batch than the one asked for")
    generators = [torch.Generator(device=pipe.device).manual_seed(int(seed)) for seed in seeds]
    if paused is None:
        scheduler, steps_before, latents = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), 0, None
    else:
        scheduler, steps_before, latents = paused.scheduler, paused.steps_done, paused.latents

    # The host queues a graph-replayed step in a few launches: left alone it queues the whole batch at once, and a
    # pause asked for then would still wait for every queued step.
    in_flight = StepsInFlight(pipe.device)
    reuse = paused.reuse if paused is not None else Reuse()

    def on_step_end(pipeline, index, timestep, tensors):
        if should_pause is None:
            return {}
        in_flight.queued()
        if should_pause():  # after the last step too: the decode can wait as well
            raise _Paused(PausedBatch(prompt, tuple(seeds), resolution, tensors["latents"].clone(), scheduler,
                                      steps_before + index + 1, steps, reuse))
        return {}

    with contextlib.ExitStack() as stack:
        if graphs is None:
            graphs = stack.enter_context(unet_graphs(pipe))
        if graphs is not None:
            stack.enter_context(graphs.installed())
        stack.enter_context(reusing(pipe.unet, deep_cache_every, graphs, reuse))
        stack.enter_context(_scheduler(pipe, scheduler if paused is None else _GoOn(scheduler, steps_before)))
        stack.enter_context(vae_batch_decoding(pipe.vae, len(seeds), resolution * resolution))
        stack.enter_context(torch.no_grad())
        try:
            return pipe(prompt=[prompt] * len(seeds), height=resolution, width=resolution, num_inference_steps=steps,
                        guidance_scale=guidance_scale, generator=generators, latents=latents,
                        output_type=output_type, callback_on_step_end=on_step_end,
                        callback_on_step_end_tensor_inputs=["latents"]).images
        except _Paused as stop:
            return stop.batch


@contextmanager
def _scheduler(pipe, scheduler):
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def save_image_atomic(image, path: Path, **save_options) -> Path:
    """PIL image to `path` through a temporary name in the same directory, in the format `path`'s suffix names."""
    from PIL import Image

    image_format = Image.registered_extensions()[Path(path).suffix.lower()]
    return write_atomic(path, lambda tmp: image.save(tmp, format=image_format, **save_options))
