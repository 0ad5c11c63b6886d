"""The reference the benchmark compares us with: the plain diffusers way, re-implemented step for step.

`reference_train` does what diffusers' `examples/dreambooth/train_dreambooth_lora.py` does with
`--with_prior_preservation --train_text_encoder --train_batch_size 1 --mixed_precision bf16|fp16` and no compile:
generate the missing class images with the plain pipeline (fp16 on CUDA, the pipeline's default 50 steps, CFG 7.5,
batches of 4, saved as JPEG), load the model parts again from disk, add LoRA adapters (gaussian init) to the UNet
attention and text-encoder attention projections, then for every step read and transform one instance and one class
photo, run the VAE and the text encoder, one UNet forward/backward on the pair, clip gradients, AdamW step, and read
the loss back for the progress bar; finally upcast the UNet and save the LoRA. Accelerate's mixed precision is
`torch.autocast` around the trained models' forwards plus a grad scaler for fp16, which is what we use here.

`ReferenceImagine` is `StableDiffusionPipeline` in fp16 with DPMSolverMultistep and `load_lora_weights`.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fixtures import TEXT_LORA_TARGETS
from bench.timing import sync

UNET_LORA_TARGETS_SCRIPT = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


@dataclass
class ReferenceTrainConfig:
    model_dir: Path
    photos_dir: Path
    work_dir: Path
    device: str
    mixed_precision: str  # "bf16" | "fp16" | "no"
    resolution: int = 512
    max_train_steps: int = 400  # batch 1: one instance + one class sample per step
    num_class_images: int = 50
    sample_batch_size: int = 4
    class_inference_steps: int = 50  # the pipeline default the script relies on
    rank: int = 4
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = True
    instance_prompt: str = "a photo of sks man"
    class_prompt: str = "a photo of man"
    seed: int = 0


def _image_to_tensor(path: Path, size: int, rng: random.Random):
    """Resize (shorter side, bilinear), random crop, to tensor in [-1, 1]: the script's torchvision transforms."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = rng.randint(0, image.width - size), rng.randint(0, image.height - size)
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


class _DreamBoothPairs:
    """Dataset of the script: length max(instances, classes); item i = instance i % n and class i % m, tokenized."""

    def __init__(self, instance_paths, class_paths, tokenizer, cfg: ReferenceTrainConfig, rng: random.Random):
        self.instance_paths, self.class_paths, self.tokenizer, self.cfg, self.rng = (
            instance_paths, class_paths, tokenizer, cfg, rng)

    def __len__(self):
        return max(len(self.instance_paths), len(self.class_paths))

    def _tokens(self, prompt):
        return self.tokenizer(prompt, truncation=True, padding="max_length",
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    def __getitem__(self, index):
        size = self.cfg.resolution
        return {
            "instance_images": _image_to_tensor(self.instance_paths[index % len(self.instance_paths)], size, self.rng),
            "instance_prompt_ids": self._tokens(self.cfg.instance_prompt),
            "class_images": _image_to_tensor(self.class_paths[index % len(self.class_paths)], size, self.rng),
            "class_prompt_ids": self._tokens(self.cfg.class_prompt),
        }


def _collate_with_prior(examples):
    import torch

    pixels = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples]
    ids = [e["instance_prompt_ids"] for e in examples] + [e["class_prompt_ids"] for e in examples]
    return {"pixel_values": torch.stack(pixels).contiguous().float(), "input_ids": torch.cat(ids, dim=0)}


def generate_class_images(cfg: ReferenceTrainConfig, class_dir: Path) -> int:
    """Fill `class_dir` up to num_class_images with the plain pipeline, as the script does before training."""
    import torch
    from diffusers import StableDiffusionPipeline

    class_dir.mkdir(parents=True, exist_ok=True)
    have = len(list(class_dir.iterdir()))
    missing = cfg.num_class_images - have
    if missing <= 0:
        return 0
    dtype = torch.float16 if cfg.device.startswith("cuda") else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(str(cfg.model_dir), torch_dtype=dtype, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(cfg.device)
    for start in range(0, missing, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, missing - start)
        images = pipeline([cfg.class_prompt] * n, num_inference_steps=cfg.class_inference_steps).images
        for i, image in enumerate(images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(class_dir / f"{start + i + have}-{digest}.jpg")
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return missing


def reference_train(cfg: ReferenceTrainConfig) -> dict:
    """Run the reference training; return wall seconds per phase (total = job start to LoRA saved)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    device, model = cfg.device, str(cfg.model_dir)
    phases: dict[str, float] = {}
    sync(device)
    start = mark = time.perf_counter()

    def lap(name):
        nonlocal mark
        sync(device)
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    class_dir = cfg.work_dir / "class_images"
    generated = generate_class_images(cfg, class_dir)
    lap("class_images_s")

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for part in (vae, text_encoder, unet):
        part.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for part in (unet, vae, text_encoder):
        part.to(device, dtype=weight_dtype)
    lap("load_s")

    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                target_modules=UNET_LORA_TARGETS_SCRIPT))
    trained = [unet]
    if cfg.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                            target_modules=TEXT_LORA_TARGETS))
        trained.append(text_encoder)
    if cfg.mixed_precision == "fp16":
        cast_training_params(trained, dtype=torch.float32)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=cfg.max_train_steps)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.mixed_precision == "fp16")
    autocast_on = cfg.mixed_precision in ("fp16", "bf16")

    rng = random.Random(cfg.seed)
    dataset = _DreamBoothPairs(sorted(p for p in cfg.photos_dir.iterdir() if p.suffix in (".png", ".jpg")),
                               sorted(class_dir.iterdir()), tokenizer, cfg, rng)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=_collate_with_prior,
                                         num_workers=0)
    epochs = math.ceil(cfg.max_train_steps / len(loader))
    lap("setup_s")

    global_step, losses = 0, []
    for _ in range(epochs):
        unet.train()
        text_encoder.train()
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device, dtype=weight_dtype)
            model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                      device=model_input.device).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            with torch.autocast(device.split(":")[0], dtype=weight_dtype, enabled=autocast_on):
                encoder_hidden_states = text_encoder(batch["input_ids"].to(device), attention_mask=None,
                                                     return_dict=False)[0]
                model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(noise, 2, dim=0)
            loss = F.mse_loss(pred.float(), target.float()) + cfg.prior_loss_weight * F.mse_loss(
                pred_prior.float(), target_prior.float())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            losses.append(loss.detach().item())  # the script's progress-bar postfix: one host sync per step
            if global_step >= cfg.max_train_steps:
                break
    lap("loop_s")

    unet = unet.to(torch.float32)
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = (convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                   if cfg.train_text_encoder else None)
    out_dir = cfg.work_dir / "lora"
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_layers)
    lap("save_s")
    phases["total_s"] = mark - start
    phases.update(steps=global_step, class_images_generated=generated, final_loss=losses[-1] if losses else None,
                  lora=str(out_dir / "pytorch_lora_weights.safetensors"),
                  step_s=phases["loop_s"] / max(1, global_step))
    del unet, text_encoder, vae, optimizer, params
    return phases


class ReferenceImagine:
    """The plain way to serve /imagine: the model's own pipeline class (StableDiffusionPipeline or
    StableDiffusionXLPipeline, from its model_index.json) in fp16, DPM-Solver++, load_lora_weights."""

    def __init__(self, model_dir: Path, device: str):
        import torch
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        self.device = device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        no_checker = {"safety_checker": None} if (Path(model_dir) / "safety_checker").exists() else {}
        self.pipe = DiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype, **no_checker)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(device)
        self.lora: Path | None = None

    def use_lora(self, path: Path) -> float:
        """Switch to another member's LoRA the plain way (unload, load from file); return the seconds it took."""
        sync(self.device)
        t = time.perf_counter()
        if self.lora is not None:
            self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(str(path))
        self.lora = path
        sync(self.device)
        return time.perf_counter() - t

    def imagine(self, prompt: str, *, steps: int, cfg: float, size: int, seed: int):
        import torch

        generator = torch.Generator(self.device).manual_seed(seed)
        return self.pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                         generator=generator).images

    def close(self):
        import torch

        del self.pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reference_cached_switch(ref: ReferenceImagine, paths: list[Path], rounds: int) -> list[float]:
    """Seconds per `set_adapters` switch between LoRAs all kept loaded as named adapters (diffusers' cached way)."""
    names = []
    ref.pipe.unload_lora_weights()
    ref.lora = None
    for i, path in enumerate(paths):
        ref.pipe.load_lora_weights(str(path), adapter_name=f"m{i}")
        names.append(f"m{i}")
    times = []
    for name in itertools.islice(itertools.cycle(names), rounds):
        sync(ref.device)
        t = time.perf_counter()
        ref.pipe.set_adapters([name])
        sync(ref.device)
        times.append(time.perf_counter() - t)
    ref.pipe.unload_lora_weights()
    return times
