"""GenerationService: /imagine on the resident pipeline — concept LoRAs, seeds, samplers, PNG files with A1111 info.

One pipeline (SD 1.x or SDXL: trainer/models/family.py says which and what differs) is loaded once and shared with
the training engine. Every request activates exactly the
adapters it needs (none when it names no concept) and deactivates them again when it ends. Per request a light
pipeline "view" is built over the same modules (the family's pipeline class over `pipe.components` with a fresh
scheduler, or its img2img class for variations), so nothing is copied and no request leaves scheduler state behind.
SDXL: prompts go through both text encoders (trainer/generation/prompt_embeds.py), the UNet also gets the pooled
embedding and the size numbers (the pipeline's own `add_time_ids`; the CUDA graphs take them as inputs), a LoRA's
layers on either text encoder are folded in while encoding, and the VAE follows diffusers' SDXL precision rule
(a fp16 VAE that overflows, `force_upcast`, decodes in fp32; the fp16-fix VAE stays fp16).

Determinism: image i of a request uses seed + i through its own CPU `torch.Generator`, so the same seed and params
give the same pixels (on the same device, dtype and library versions). Re-roll = the same params with a new seed.

Speed (docs/BENCHMARKS.md), LoRAs through trainer/generation/lora_slots.py: when every row of a denoising loop uses the same
LoRAs (a single request, or requests with the same concepts and weights), and always for the text encoder (once per
request), the LoRAs are folded into the base weights for the loop and the weights restored bit-exact after it, so
the model runs as fast as with no LoRA. `imagine_many(requests)` batches compatible requests (same size, steps, cfg,
sampler, prompt length; text-to-image) into one loop of up to `max_batch_images` images; when their LoRAs differ,
each member's LoRA reaches only their own rows through ONE fixed-rank peft adapter (the slot, filled in place) with
a per-row mask on its ranks. On CUDA the UNet forward replays from CUDA graphs (trainer/generation/fast_unet.py). The
VAE decodes one image at a time (memory for a 12 GB card) unless the GPU has room. Images become bytes on the GPU and
are written by a small thread pool while the GPU goes on. With `aot_dir`, the UNet forward is compiled ahead of time
for the shapes served, in a separate process, and used once ready (trainer/generation/aot_kernels.py; `idle()` adopts
what finished). With `deep_cache_every` above 1 the UNet's deep features are reused between sampler steps
(trainer/generation/deep_cache.py): a whole forward on every n-th step, only its head on the others.
"""
from __future__ import annotations

import inspect
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from trainer.contract import batching
from trainer.contract.aspects import size_for
from trainer.generation import safety
from trainer.contract.errors import Cancelled, UserError
from trainer.generation.deep_cache import effective_every, reusing
from trainer.generation.fast_unet import UNetGraphs
from trainer.contract.imagine_request import (DEFAULT_DEEP_CACHE, SEED_MAX, ImagineRequest, check_deep_cache,
                                              check_size, size_range)
from trainer.generation.lora_slots import LoraSlots
from trainer.generation.pnginfo import format_parameters, lora_hashes_field, make_grid, save_png, small_copy
from trainer.generation.previews import save_preview
from trainer.generation.prompt_embeds import encode_prompts_many, encode_prompts_xl
from trainer.generation.schedulers import make_scheduler, sampler_label
from trainer.models.family import family_of
from trainer.training import memory

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
    seconds: float = 0.0            # the engine's time for this request: options checked -> files written

    def to_dict(self) -> dict:
        return asdict(self)


def native_side(pipe) -> int:
    """The model's training resolution (512 for SD 1.5): UNet sample size times the VAE's scale factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def loras_key(group: tuple) -> tuple:
    """Which LoRAs a group of ((CachedLora, weight), ...) applies and how strongly, in any order."""
    return tuple(sorted((id(lora), float(weight)) for lora, weight in group))


def same_loras(groups: Sequence[tuple]) -> bool:
    """Whether every group of ((CachedLora, weight), ...) applies the same LoRAs with the same weights."""
    return len({loras_key(group) for group in groups}) <= 1


@contextmanager
def vae_batch_decoding(vae, images: int, pixels_each: int):
    """Decode (and encode) a batch image by image: 4 at once need 2.15 GB more than 1 (0.64 GB) for 61 vs 84 ms of GPU
    time at 512²; in one go where the GPU has room (trainer/training/memory.py, `vae_decodes_whole_batches`). The VAE
    is shared with training, so its own setting is put back afterwards."""
    if images <= 1 or getattr(vae, "use_slicing", True) or memory.vae_decodes_whole_batches(vae, images, pixels_each):
        yield
        return
    vae.enable_slicing()
    try:
        yield
    finally:
        vae.disable_slicing()


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """[0, 1] NCHW images as PIL RGB, rounded as diffusers' "pil" output rounds them but converted to bytes on their
    own device, so the host copies a quarter of the data and does no float maths on it."""
    data = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in data]


def preview_interval(total: int) -> int:
    """Every few steps: about a third of the run, at most every 5 steps."""
    return max(1, min(5, total // 3))


@dataclass
class _Prepared:
    """One request, checked, with its size, seeds, LoRAs and text embeddings: ready to join a denoising batch."""
    request: ImagineRequest
    started: float
    width: int
    height: int
    seed: int
    seeds: list[int]
    init_image: Image.Image | None
    loras: tuple            # ((CachedLora, weight), ...) in the order of parsed.uses
    notices: list[str]
    embeddings: object = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one denoising loop; None = runs alone (img2img). Beyond the rule the bot
        batches by (trainer/contract/batching.py), their prompts must encode to the same length."""
        r = self.request
        options = {"width": self.width, "height": self.height, "steps": r.steps, "cfg": r.cfg, "scheduler": r.scheduler}
        key = batching.batch_key(options, variation=self.init_image is not None)
        return None if key is None else (*key, tuple(self.embeddings.prompt.shape))


class GenerationService:
    def __init__(self, pipe, *, model_name: str, model_hash: str | None = None, adapter_capacity: int = 8,
                 max_batch_images: int = batching.MAX_BATCH_IMAGES, use_cuda_graphs: bool = True,
                 channels_last: bool = True, compile_unet: bool = False, aot_dir: Path | None = None,
                 training_held: Callable[[], bool] = lambda: False, deep_cache_every: int = DEFAULT_DEEP_CACHE):
        """`training_held()`: whether a yielded training is resident in the pipeline now (the worker's); while it is,
        no compiled forward's graph is captured (trainer/generation/fast_unet.py). `deep_cache_every`: a whole UNet
        forward on every n-th sampler step, the deep cache's head on the others (1: off; ignored for a UNet the
        deep cache does not fit)."""
        self.pipe = pipe
        self.model_name = model_name
        self.model_hash = model_hash
        self.family = family_of(pipe)
        self.adapters = LoraSlots(pipe, capacity=adapter_capacity)
        self.max_batch_images = max_batch_images
        self.preview_min_interval_s = 1.0  # a preview is written at most this often (a fast job needs none)
        self.deep_cache_every = effective_every(pipe.unet, check_deep_cache(deep_cache_every))
        self.graphs = None
        graphs = use_cuda_graphs and UNetGraphs.usable(pipe.unet)
        if graphs and channels_last:  # faster convolutions (docs/BENCHMARKS.md: 12.0 -> 10.3 ms per CFG step in a graph)
            pipe.unet.to(memory_format=torch.channels_last)
        self.aot = None
        if aot_dir is not None:  # after the memory format: the packages are compiled for it
            from trainer.generation.aot_kernels import AotKernels

            self.aot = AotKernels(pipe.unet, aot_dir, batch_rows=(2 * max_batch_images,),  # CFG: two rows an image
                                  planned_slot=self.adapters.planned_layout)
        if graphs or self.aot is not None:
            self.graphs = UNetGraphs(pipe.unet, state_key=lambda: (self.adapters.unet_active(), self.adapters.version),
                                     compile=compile_unet and graphs, aot=self.aot, training_held=training_held,
                                     slot=self.adapters.unet_in_use, exercise_slot=self.adapters.exercised)
        # A batch's images are encoded side by side (OpenCV's encoder lets go of the GIL): 8 PNGs of 512² took 38 ms
        # on 4 threads and 23 ms on 8 on the H200 host, while the member waits.
        self._writer = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 4), thread_name_prefix="imagine-png")

    @property
    def native_side(self) -> int:
        return native_side(self.pipe)

    def size_range(self) -> tuple[int, int]:
        return size_range(self.native_side)

    def imagine(self, request: ImagineRequest, *, on_progress: Callable | None = None,
                should_stop: Callable[[], bool] | None = None) -> ImagineResult:
        return self.imagine_many([request], on_progress=on_progress, should_stop=should_stop)[0]

    def imagine_many(self, requests: Sequence[ImagineRequest], *, on_progress: Callable | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[ImagineResult]:
        """Serve several requests (e.g. several members', each with their own LoRAs); results in request order.

        Compatible requests share denoising loops; a UserError in any request (checked before the GPU starts)
        fails the whole call, naming the problem. Each request's images are exactly what it would get alone, up to
        float rounding of the larger batch.
        """
        if should_stop and should_stop():
            raise Cancelled()
        prepared = [self._prepare(r) for r in requests]
        same_text_loras: dict[tuple, list[_Prepared]] = {}
        for item in prepared:
            same_text_loras.setdefault(loras_key(item.loras), []).append(item)
        for items in same_text_loras.values():
            self._encode(items)
        saving = [None] * len(prepared)
        for batch in self._batches(prepared):
            images = self._denoise([prepared[i] for i in batch], on_progress, should_stop)
            for index, item_images in zip(batch, images):
                saving[index] = self._writer.submit(self._finish, prepared[index], item_images)
        if self.aot is not None:
            try:
                self.aot.compile_wanted()  # shapes this call served without a compiled forward
            except Exception:  # noqa: BLE001 - only speed is at stake, the images are made
                log.exception("starting the UNet compiling process failed")
        return [future.result() for future in saving]

    def idle(self) -> None:
        """Nothing is waiting for the GPU: adopt the forwards compiled since, or by an earlier run (their CUDA graphs
        captured now, not in a member's request), and start compiling the shapes still wanted. Only here: the worker
        calls it when idle and before its warm-up."""
        if self.aot is None:
            return
        self.graphs.adopt_compiled()
        self.aot.compile_wanted()

    def stop_compiling(self) -> None:
        """End the compiling process, if one runs (the model is evicted, the worker stops)."""
        if self.aot is not None:
            self.aot.close()

    def release_memory(self) -> None:
        """Give the GPU memory generation keeps between requests back (the CUDA graphs' pools, the copies of base
        weights kept for folding LoRAs, the allocator's cache) before a training job needs it; the next request makes
        them again (graphs: about a second per shape)."""
        if self.graphs is not None:
            if self.graphs.kept:
                log.info("generation's memory released: %d CUDA graph(s) dropped", self.graphs.kept)
            self.graphs.clear()
        self.adapters.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- preparing ---------------------------------------------------------------------------------------------
    def _prepare(self, request: ImagineRequest) -> _Prepared:
        started = time.monotonic()
        parsed = request.parsed
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
        loras = tuple((self.adapters.get(use.concept.lora_path, use.concept.token), float(use.weight))
                      for use in parsed.uses)
        return _Prepared(request, started, width, height, seed, seeds, init_image, loras, list(parsed.notices))

    def _encode(self, items: list[_Prepared]) -> None:
        """The requests' prompts, which use the same LoRAs (folded into the text encoders once for all of them)."""
        family, pipe = self.family, self.pipe
        with ExitStack() as folded:
            for name in family.text_encoders:
                folded.enter_context(self.adapters.folded(name, items[0].loras))
            if family.extra_conditioning:
                for item in items:
                    item.embeddings = encode_prompts_xl(
                        family.tokenizer_modules(pipe), family.text_encoder_modules(pipe), item.request.parsed.text,
                        item.request.negative,
                        zero_empty_negative=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))
            else:
                pairs = [(item.request.parsed.text, item.request.negative) for item in items]
                for item, embeddings in zip(items, encode_prompts_many(pipe.tokenizer, pipe.text_encoder, pairs)):
                    item.embeddings = embeddings
        for item in items:
            if item.embeddings.truncated_to:
                item.notices.append(f"Your prompt is {item.embeddings.tokens} tokens long; only the first "
                                    f"{item.embeddings.truncated_to} were used.")

    def _batches(self, prepared: list[_Prepared]) -> list[list[int]]:
        """Indexes of requests per denoising loop: equal keys, at most max_batch_images images, LoRAs that fit."""
        batches: list[list[int]] = []
        open_by_key: dict[tuple, list[int]] = {}
        for index, item in enumerate(prepared):
            key = item.batch_key()
            batch = open_by_key.get(key) if key is not None else None
            if batch is not None:
                images = sum(len(prepared[i].seeds) for i in batch) + len(item.seeds)
                if images <= self.max_batch_images and self.adapters.fits([prepared[i].loras for i in batch + [index]]):
                    batch.append(index)
                    continue
            batch = [index]
            batches.append(batch)
            if key is not None:
                open_by_key[key] = batch
        return batches

    # --- denoising -----------------------------------------------------------------------------------------------
    def _denoise(self, items: list[_Prepared], on_progress, should_stop) -> list[list[Image.Image]]:
        rows = [g for g, item in enumerate(items) for _ in item.seeds]
        groups = [item.loras for item in items]
        if same_loras(groups):
            applied = self.adapters.folded("unet", groups[0])
        else:  # Classifier-free guidance runs the negative rows first, then the positive ones, in request order.
            applied = self.adapters.active(unet_groups=groups, unet_rows=rows + rows)
        with applied, vae_batch_decoding(self.pipe.vae, len(rows), items[0].width * items[0].height):
            images = self._run(items, on_progress, should_stop)
        out, start = [], 0
        for item in items:
            out.append(images[start:start + len(item.seeds)])
            start += len(item.seeds)
        return out

    def _run(self, items: list[_Prepared], on_progress, should_stop) -> list[Image.Image]:
        first = items[0]
        request = first.request
        view = self._view(request.scheduler, img2img=first.init_image is not None)
        if first.init_image is None:
            call = dict(width=first.width, height=first.height)
        else:
            call = dict(image=[first.init_image] * len(first.seeds), strength=request.strength)
        preview_path = request.preview_path or request.out_dir / "preview.webp"
        started = time.monotonic()
        last_preview = [started]
        latest_preview: list[str | None] = [None]

        def on_step_end(pipeline, index, timestep, tensors):
            step, total = index + 1, pipeline.num_timesteps
            if should_stop and should_stop():
                raise Cancelled()
            now = time.monotonic()
            if (step < total and step % preview_interval(total) == 0
                    and now - last_preview[0] >= self.preview_min_interval_s):
                latents = tensors["latents"][:len(first.seeds)]
                latest_preview[0] = str(save_preview(latents, preview_path, scale=pipeline.vae_scale_factor // 2 or 1,
                                                     family=self.family.name))
                last_preview[0] = now
            if on_progress:
                elapsed = now - started
                on_progress(GenerationProgress(step, total, elapsed / step * (total - step), latest_preview[0]))
            return tensors

        repeat = [len(item.seeds) for item in items]
        prompt = torch.cat([item.embeddings.prompt.expand(n, -1, -1) for item, n in zip(items, repeat)])
        negative = torch.cat([item.embeddings.negative.expand(n, -1, -1) for item, n in zip(items, repeat)])
        if self.family.extra_conditioning:
            call.update(
                pooled_prompt_embeds=torch.cat([i.embeddings.pooled.expand(n, -1) for i, n in zip(items, repeat)]),
                negative_pooled_prompt_embeds=torch.cat([i.embeddings.negative_pooled.expand(n, -1)
                                                         for i, n in zip(items, repeat)]))
        generators = [torch.Generator("cpu").manual_seed(s) for item in items for s in item.seeds]
        graphed = self.graphs is not None and first.init_image is None
        graphs = self.graphs.installed() if graphed else nullcontext()
        with graphs, reusing(self.pipe.unet, self.deep_cache_every, self.graphs if graphed else None):
            output = view(
                prompt_embeds=prompt, negative_prompt_embeds=negative,
                num_inference_steps=request.steps, guidance_scale=request.cfg, num_images_per_prompt=1,
                generator=generators, output_type="pt",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"], **call,
            )
        return pil_images(output.images)

    def _view(self, scheduler: str, *, img2img: bool):
        """The family's (img2img) pipeline class over the resident modules, with a fresh scheduler."""
        cls = self.family.diffusers_class(img2img)
        accepted = inspect.signature(cls.__init__).parameters
        components = {name: module for name, module in self.pipe.components.items() if name in accepted}
        components["scheduler"] = make_scheduler(scheduler, self.pipe.scheduler.config)
        if "requires_safety_checker" in accepted:  # SD 1.x: the safety filter runs after, in _finish
            components.update(safety_checker=None, requires_safety_checker=False)
        if "add_watermarker" in accepted:  # SDXL: no invisible watermark (it changes pixels and needs a package)
            components["add_watermarker"] = False
        if "force_zeros_for_empty_prompt" in accepted:
            components["force_zeros_for_empty_prompt"] = bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt",
                                                                      True))
        view = cls(**components)
        view.set_progress_bar_config(disable=True)
        return view

    # --- after the GPU -------------------------------------------------------------------------------------------
    def _finish(self, item: _Prepared, images: list[Image.Image]) -> ImagineResult:
        request, parsed, notices = item.request, item.request.parsed, item.notices
        flagged = safety.flag_images(self.pipe, images) if request.safety else [False] * len(images)
        blocked = [i for i, f in enumerate(flagged) if f]
        if blocked:
            which = ", ".join(str(i + 1) for i in blocked)
            notices.append(f"The safety filter hid image {which}." if len(blocked) == 1 else
                           f"The safety filter hid images {which}.")
        fields = {
            "Steps": request.steps, "Sampler": sampler_label(request.scheduler), "CFG scale": f"{request.cfg:g}",
            "Seed": None, "Size": f"{item.width}x{item.height}", **self._size_conditioning(item),
            "Model hash": self.model_hash, "Model": self.model_name,
            "Deep cache": f"every {self.deep_cache_every} steps" if self.deep_cache_every > 1 else None,
            "Denoising strength": f"{request.strength:g}" if item.init_image is not None else None,
            "Lora hashes": lora_hashes_field([(u.concept.token, lora.short_hash)
                                              for u, (lora, _) in zip(parsed.uses, item.loras)]),
            "Job id": request.job_id,
        }
        saved, saved_seeds, texts, grid, small = self._save(request, parsed, fields, images, item.seeds, flagged,
                                                            notices)
        seconds = time.monotonic() - item.started
        log.info("imagine job=%s: %d image(s) %dx%d, %d steps, %s, %d LoRA(s), %.2fs", request.job_id, len(images),
                 item.width, item.height, request.steps, request.scheduler, len(item.loras), seconds)
        return ImagineResult(saved, grid, small, item.seed, saved_seeds, texts[0], blocked, notices, round(seconds, 4))

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

    def _size_conditioning(self, item: _Prepared) -> dict:
        """SDXL's size conditioning as the pipeline applied it (original = target = the image size, no crop)."""
        if not self.family.extra_conditioning:
            return {}
        size = f"{item.width}x{item.height}"
        return {"Original size": size, "Target size": size, "Crop top-left": "0x0"}

    def _load_init_image(self, request: ImagineRequest) -> Image.Image | None:
        if request.init_image is None:
            return None
        try:
            with Image.open(request.init_image) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError):
            raise UserError("The image to make variations of could not be read; it may have been deleted.") from None

    def _size(self, request: ImagineRequest, init_image: Image.Image | None) -> tuple[int, int]:
        width, height = request.width, request.height
        if init_image is not None:  # variations keep their image's size unless the request names one
            width, height = width or init_image.width // 8 * 8, height or init_image.height // 8 * 8
        elif width is None and height is None and request.size is not None:
            width, height = size_for(self.family.facts, request.size)
        return check_size(width, height, self.native_side, self.family.facts)

    def _small_copy(self, image, png_path: Path, text: str, limit: int | None, small: dict, notices: list) -> None:
        if not limit or png_path.stat().st_size <= limit:
            return
        copy = small_copy(image, limit, png_path.with_name(png_path.stem + ".small.webp"), text)
        if copy is None:
            notices.append(f"{png_path.name} is too big to upload here, even shrunk.")
        else:
            small[str(png_path)] = str(copy)
