"""GenerationService: /imagine on the resident pipeline — concept LoRAs, seeds, samplers, PNG files with A1111 info.

One StableDiffusionPipeline is loaded once and shared with the training engine. Every request activates exactly the
adapters it needs (none when it names no concept) and deactivates them again when it ends. Per request a light
pipeline "view" is built over the same modules (`StableDiffusionPipeline(**pipe.components)` with a fresh scheduler,
or the img2img class for variations), so nothing is copied and no request leaves scheduler state behind.

Determinism: image i of a request uses seed + i through its own CPU `torch.Generator`, so the same seed and params
give the same pixels (on the same device, dtype and library versions). Re-roll = the same params with a new seed.

`imagine_many(requests)` is the batch-shaped entry point; for now it runs the requests one after another (batching
several members' requests with different LoRAs in one forward pass is a later performance step).
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image, UnidentifiedImageError

from trainer import safety
from trainer.adapters import AdapterCache, activate
from trainer.errors import Cancelled, UserError
from trainer.imagine_request import SEED_MAX, ImagineRequest
from trainer.pnginfo import format_parameters, lora_hashes_field, make_grid, save_png, small_copy
from trainer.previews import save_preview
from trainer.prompt_embeds import encode_prompts
from trainer.schedulers import make_scheduler, sampler_label

__all__ = ["GenerationService", "ImagineRequest", "ImagineResult", "GenerationProgress"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationProgress:
    step: int
    total: int
    eta_s: float | None
    preview: str | None  # the latest preview file (rewritten in place), None until the first one exists
    loss: float | None = None  # always None here; the training engine's progress has the same fields


@dataclass
class ImagineResult:
    images: list[str]               # saved PNGs (flagged images are not saved)
    grid: str | None                # grid.png when more than one image was saved
    small: dict[str, str]           # png path -> copy under the upload limit, for PNGs over it
    seed: int                       # the request's base seed (image i used seed + i)
    seeds: list[int]                # the seed of each saved image, aligned with `images`
    parameters: str                 # A1111 parameters text of the first image
    blocked: list[int] = field(default_factory=list)   # indexes (0..count-1) hidden by the safety checker
    notices: list[str] = field(default_factory=list)   # things the member should be told

    def to_dict(self) -> dict:
        return asdict(self)


def preview_interval(total: int) -> int:
    """Every few steps: about a third of the run, at most every 5 steps."""
    return max(1, min(5, total // 3))


class GenerationService:
    def __init__(self, pipe, *, model_name: str, model_hash: str | None = None, adapter_capacity: int = 8):
        self.pipe = pipe
        self.model_name = model_name
        self.model_hash = model_hash
        self.adapters = AdapterCache(pipe, adapter_capacity)

    @property
    def native_side(self) -> int:
        """The model's training resolution (512 for SD 1.5): UNet sample size times the VAE's scale factor."""
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def size_range(self) -> tuple[int, int]:
        return max(64, self.native_side // 2), self.native_side * 2

    def imagine_many(self, requests: Sequence[ImagineRequest], *, on_progress=None, should_stop=None) -> list[ImagineResult]:
        return [self.imagine(r, on_progress=on_progress, should_stop=should_stop) for r in requests]

    def imagine(self, request: ImagineRequest, *, on_progress: Callable | None = None,
                should_stop: Callable[[], bool] | None = None) -> ImagineResult:
        started = time.monotonic()
        if should_stop and should_stop():
            raise Cancelled()
        parsed = request.parsed
        notices = list(parsed.notices)
        if request.safety:
            safety.check_prompt(parsed.text, request.blocked_words)
        init_image = self._load_init_image(request)
        width, height = self._size(request, init_image)
        if init_image is not None:
            if int(request.steps * request.strength) < 1:
                raise UserError(f"With {request.steps} steps and strength {request.strength:g} nothing would change; "
                                "raise the steps or the strength.")
            if init_image.size != (width, height):
                init_image = init_image.resize((width, height), Image.Resampling.LANCZOS)
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
        seeds = [(seed + i) % (SEED_MAX + 1) for i in range(request.count)]

        loaded = []
        for use in parsed.uses:
            loaded.append(self.adapters.get(use.concept.lora_path, use.concept.token, keep={a.name for a in loaded}))
        activate(self.pipe, [a.name for a in loaded], [use.weight for use in parsed.uses])
        try:
            embeddings = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, parsed.text, request.negative)
            if embeddings.truncated_to:
                notices.append(f"Your prompt is {embeddings.tokens} tokens long; only the first "
                               f"{embeddings.truncated_to} were used.")
            images = self._run(request, init_image, width, height, seeds, embeddings, on_progress, should_stop)
        finally:
            activate(self.pipe, [], [])

        flagged = safety.flag_images(self.pipe, images) if request.safety else [False] * len(images)
        blocked = [i for i, f in enumerate(flagged) if f]
        if blocked:
            which = ", ".join(str(i + 1) for i in blocked)
            notices.append(f"The safety filter hid image {which}." if len(blocked) == 1 else
                           f"The safety filter hid images {which}.")

        fields = {
            "Steps": request.steps, "Sampler": sampler_label(request.scheduler), "CFG scale": f"{request.cfg:g}",
            "Seed": None, "Size": f"{width}x{height}", "Model hash": self.model_hash, "Model": self.model_name,
            "Denoising strength": f"{request.strength:g}" if init_image is not None else None,
            "Lora hashes": lora_hashes_field([(u.concept.token, a.short_hash) for u, a in zip(parsed.uses, loaded)]),
            "Job id": request.job_id,
        }
        saved, saved_seeds, texts, grid, small = self._save(request, parsed, fields, images, seeds, flagged, notices)
        log.info("imagine job=%s: %d image(s) %dx%d, %d steps, %s, %d LoRA(s), %.1fs", request.job_id, len(images),
                 width, height, request.steps, request.scheduler, len(loaded), time.monotonic() - started)
        return ImagineResult(saved, grid, small, seed, saved_seeds, texts[0], blocked, notices)

    def _save(self, request, parsed, fields, images, seeds, flagged, notices):
        """Write NNN.png (+ NNN.small.webp when over the upload limit) per unflagged image, and grid.png for several."""
        out_dir = request.out_dir.resolve()
        saved, saved_seeds, texts, small = [], [], [], {}
        for i, (image, image_seed) in enumerate(zip(images, seeds)):
            text = format_parameters(parsed.a1111_prompt(), request.negative, {**fields, "Seed": image_seed})
            texts.append(text)
            if flagged[i]:
                continue
            path = save_png(image, out_dir / f"{i:03d}.png", text)
            saved.append(str(path))
            saved_seeds.append(image_seed)
            self._small_copy(image, path, text, request.upload_limit, small, notices)
        grid = None
        if len(saved) > 1:
            grid_image = make_grid([im for im, f in zip(images, flagged) if not f])
            first_text = texts[flagged.index(False)]
            grid_path = save_png(grid_image, out_dir / "grid.png", first_text)
            grid = str(grid_path)
            self._small_copy(grid_image, grid_path, first_text, request.upload_limit, small, notices)
        return saved, saved_seeds, texts, grid, small

    def _run(self, request, init_image, width, height, seeds, embeddings, on_progress, should_stop):
        components = {**self.pipe.components, "scheduler": make_scheduler(request.scheduler, self.pipe.scheduler.config),
                      "safety_checker": None, "requires_safety_checker": False}
        if init_image is None:
            view = StableDiffusionPipeline(**components)
            call = dict(width=width, height=height)
        else:
            view = StableDiffusionImg2ImgPipeline(**components)
            call = dict(image=init_image, strength=request.strength)
        view.set_progress_bar_config(disable=True)
        preview_path = request.preview_path or request.out_dir / "preview.webp"
        started = time.monotonic()
        latest_preview: list[str | None] = [None]

        def on_step_end(pipeline, index, timestep, tensors):
            step, total = index + 1, pipeline.num_timesteps
            if should_stop and should_stop():
                raise Cancelled()
            if step < total and step % preview_interval(total) == 0:
                latest_preview[0] = str(save_preview(tensors["latents"], preview_path, scale=pipeline.vae_scale_factor // 2 or 1))
            if on_progress:
                elapsed = time.monotonic() - started
                on_progress(GenerationProgress(step, total, elapsed / step * (total - step), latest_preview[0]))
            return tensors

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        output = view(
            prompt_embeds=embeddings.prompt, negative_prompt_embeds=embeddings.negative,
            num_inference_steps=request.steps, guidance_scale=request.cfg, num_images_per_prompt=len(seeds),
            generator=generators, output_type="pil",
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"], **call,
        )
        return list(output.images)

    def _load_init_image(self, request: ImagineRequest) -> Image.Image | None:
        if request.init_image is None:
            return None
        try:
            with Image.open(request.init_image) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError):
            raise UserError("The image to make variations of could not be read; it may have been deleted.") from None

    def _size(self, request: ImagineRequest, init_image: Image.Image | None) -> tuple[int, int]:
        lo, hi = self.size_range()
        if init_image is not None:
            default_w, default_h = init_image.width // 8 * 8, init_image.height // 8 * 8
        else:
            default_w = default_h = self.native_side
        width, height = request.width or default_w, request.height or default_h
        for label, value in (("width", width), ("height", height)):
            if not lo <= value <= hi:
                raise UserError(f"The {label} must be a multiple of 8 from {lo} to {hi} for this model (got {value}).")
        return width, height

    def _small_copy(self, image, png_path: Path, text: str, limit: int | None, small: dict, notices: list) -> None:
        if not limit or png_path.stat().st_size <= limit:
            return
        copy = small_copy(image, limit, png_path.with_name(png_path.stem + ".small.webp"), text)
        if copy is None:
            notices.append(f"{png_path.name} is too big to upload here, even shrunk.")
        else:
            small[str(png_path)] = str(copy)
