"""The SDXL reference: diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`, re-implemented step for step
in-process, as bench/reference.py does for the SD 1.5 script.

With `--mixed_precision bf16|fp16 --train_batch_size 1 --rank R` and, as the config says, `--with_prior_preservation`
and `--train_text_encoder`: generate the missing class images with the plain StableDiffusionXLPipeline (the pipeline's
default 50 steps, batches of 4), load the parts again, VAE in fp32 (the script keeps SDXL's VAE in fp32 unless a
fp16-fix VAE is given), LoRA on the UNet's attention projections (and both text encoders' when they train). Every step
reads one instance and one class photo (resize, random crop, remembering original size and crop for the size
conditioning), encodes them with the VAE, encodes the prompts with both text encoders (once up front when they do not
train, as the script precomputes them), one UNet forward/backward on the pair with `add_time_ids` and the pooled
embeddings, clipping, AdamW, the loss read back for the progress bar; at the end the LoRA is saved.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from bench.timing import sync

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ReferenceSdxlConfig:
    model_dir: Path
    photos_dir: Path
    work_dir: Path
    device: str
    mixed_precision: str  # "bf16" | "fp16" | "no"
    resolution: int = 1024
    max_train_steps: int = 400
    with_prior_preservation: bool = True
    num_class_images: int = 50
    sample_batch_size: int = 4
    class_inference_steps: int = 50
    train_text_encoder: bool = True
    rank: int = 4
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-6
    max_grad_norm: float = 1.0
    prior_loss_weight: float = 1.0
    instance_prompt: str = "a photo of sks man"
    class_prompt: str = "a photo of man"
    seed: int = 0


def _load_photo(path: Path, size: int, rng: random.Random):
    """(pixels in [-1, 1], original (h, w), crop (top, left)): the script's resize + random crop + its bookkeeping."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    original = (image.height, image.width)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    top, left = rng.randint(0, image.height - size), rng.randint(0, image.width - size)
    image = image.crop((left, top, left + size, top + size))
    pixels = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
    return pixels, original, (top, left)


def generate_class_images(cfg: ReferenceSdxlConfig, class_dir: Path) -> int:
    import torch
    from diffusers import StableDiffusionXLPipeline

    class_dir.mkdir(parents=True, exist_ok=True)
    have = len(list(class_dir.iterdir()))
    missing = cfg.num_class_images - have
    if missing <= 0:
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(cfg.model_dir), torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(cfg.device)
    for start in range(0, missing, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, missing - start)
        images = pipeline([cfg.class_prompt] * n, num_inference_steps=cfg.class_inference_steps,
                          height=cfg.resolution, width=cfg.resolution).images
        for i, image in enumerate(images):
            image.save(class_dir / f"{start + i + have}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg")
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return missing


def _encode_prompt(text_encoders, ids_list):
    """The script's encode_prompt: penultimate hidden states of both encoders side by side, pooled from the last."""
    import torch

    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, ids_list):
        out = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled


def reference_train_sdxl(cfg: ReferenceSdxlConfig) -> dict:
    """Run the reference training; return wall seconds per phase (total = job start to LoRA saved)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
    generated = generate_class_images(cfg, class_dir) if cfg.with_prior_preservation else 0
    lap("class_images_s")

    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    for part in (vae, unet, *text_encoders):
        part.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)
    lap("load_s")

    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    trained = [unet]
    if cfg.train_text_encoder:
        for encoder in text_encoders:
            encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS))
        trained += text_encoders
    if cfg.mixed_precision == "fp16":
        cast_training_params(trained, dtype=torch.float32)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for e in text_encoders for p in e.parameters() if p.requires_grad],
                       "lr": cfg.text_encoder_lr})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.mixed_precision == "fp16")
    autocast_on = cfg.mixed_precision in ("fp16", "bf16")

    def tokens(prompt):
        return [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True,
                  return_tensors="pt").input_ids for t in tokenizers]

    prompts = [cfg.instance_prompt] + ([cfg.class_prompt] if cfg.with_prior_preservation else [])
    ids = [torch.cat(pair) for pair in zip(*(tokens(p) for p in prompts))]  # [instance, class] per tokenizer
    if not cfg.train_text_encoder:
        with torch.no_grad():
            fixed_embeds, fixed_pooled = _encode_prompt(text_encoders, ids)

    rng = random.Random(cfg.seed)
    instances = sorted(p for p in cfg.photos_dir.iterdir() if p.suffix in (".png", ".jpg"))
    classes = sorted(class_dir.iterdir()) if cfg.with_prior_preservation else []
    length = max(len(instances), len(classes))
    lap("setup_s")

    def time_ids(original, crop):
        return torch.tensor([[*original, *crop, cfg.resolution, cfg.resolution]], device=device, dtype=weight_dtype)

    global_step, losses = 0, []
    for _ in range(math.ceil(cfg.max_train_steps / length)):
        unet.train()
        for index in rng.sample(range(length), length):  # DataLoader(shuffle=True), batch 1
            items = [_load_photo(instances[index % len(instances)], cfg.resolution, rng)]
            if cfg.with_prior_preservation:
                items.append(_load_photo(classes[index % len(classes)], cfg.resolution, rng))
            pixels = torch.stack([item[0] for item in items]).to(device, dtype=torch.float32)
            latents = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            add_time_ids = torch.cat([time_ids(item[1], item[2]) for item in items])
            with torch.autocast(device.split(":")[0], dtype=weight_dtype, enabled=autocast_on):
                if cfg.train_text_encoder:
                    embeds, pooled = _encode_prompt(text_encoders, ids)
                else:
                    embeds, pooled = fixed_embeds, fixed_pooled
                pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": add_time_ids,
                                                                         "text_embeds": pooled},
                            return_dict=False)[0]
            if cfg.with_prior_preservation:
                pred, pred_prior = torch.chunk(pred, 2, dim=0)
                target, target_prior = torch.chunk(noise, 2, dim=0)
                loss = F.mse_loss(pred.float(), target.float()) + cfg.prior_loss_weight * F.mse_loss(
                    pred_prior.float(), target_prior.float())
            else:
                loss = F.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            global_step += 1
            losses.append(loss.detach().item())
            if global_step >= cfg.max_train_steps:
                break
        if global_step >= cfg.max_train_steps:
            break
    lap("loop_s")

    unet = unet.to(torch.float32)
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if cfg.train_text_encoder:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoders[0]))
        layers["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoders[1]))
    out_dir = cfg.work_dir / "lora"
    StableDiffusionXLPipeline.save_lora_weights(save_directory=str(out_dir), **layers)
    lap("save_s")
    phases["total_s"] = mark - start
    phases.update(steps=global_step, class_images_generated=generated, final_loss=losses[-1] if losses else None,
                  lora=str(out_dir / "pytorch_lora_weights.safetensors"),
                  step_s=phases["loop_s"] / max(1, global_step))
    del unet, text_encoders, vae, optimizer, params
    return phases
