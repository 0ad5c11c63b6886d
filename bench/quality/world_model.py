"""The world model: a small Stable Diffusion (the SD 1.x diffusers classes: UNet2DConditionModel, CLIPTextModel +
CLIPTokenizer, AutoencoderKL) trained from scratch on the procedural world, so that a concept trained on it can be
scored by what its pictures show.

`build(out_dir, size=...)` trains, in order: the VAE (reconstruction of renders), the readers (on renders and on
the VAE's round trips), then the UNet and the text encoder together (ε-prediction, SD 1.5's noise schedule, 10 %
empty captions for classifier-free guidance, an EMA of the weights is what is saved). It writes a diffusers folder
(`StableDiffusionPipeline.from_pretrained` and the bot's `trainer.models.loading.load_pipeline` load it) with
`readers.safetensors` and `world_model.json` (the sizes, the steps made and the readers' accuracy) beside it.
Seeds fix every random draw; on a GPU the result is still not bit-for-bit repeatable (kernels), so the repository
is meant to keep the built copy (bench/quality/assets/world-model; not built yet).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.quality import readers as readers_mod
from bench.quality import world

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "world-model"  # where the built model is to be committed
READERS_FILE = "readers.safetensors"
INFO_FILE = "world_model.json"
EMPTY_CAPTION_P = 0.1

# Two sizes: "full" (to be trained on the GPU and committed) and "tiny" (CI-sized, for checking that building works).
SIZES = {
    "full": dict(unet_channels=(64, 128, 192), unet_layers=1, text_hidden=128, text_layers=4, vae_channels=(32, 64, 64),
                 batch=256, vae_steps=1500, reader_steps=1500, unet_steps=6000, lr=4e-4),
    "tiny": dict(unet_channels=(32, 32, 64), unet_layers=1, text_hidden=32, text_layers=2, vae_channels=(16, 32, 32),
                 batch=8, vae_steps=4, reader_steps=4, unet_steps=4, lr=4e-4),
}


def build_components(size: str = "full"):
    """Fresh (untrained) components of the given size: (unet, vae, text_encoder, tokenizer, scheduler)."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.models.tiny import KNOWN_WORDS, SD15_SCHEDULER_CONFIG, write_tiny_tokenizer

    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp), words=tuple(dict.fromkeys(KNOWN_WORDS + world.WORDS)))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    hidden = cfg["text_hidden"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=cfg["text_layers"],
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    vae_channels = cfg["vae_channels"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=world.SIZE)
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // factor, in_channels=4, out_channels=4, layers_per_block=cfg["unet_layers"],
        block_out_channels=cfg["unet_channels"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=8, norm_num_groups=16)
    return unet, vae, text_encoder, tokenizer, PNDMScheduler(**SD15_SCHEDULER_CONFIG)


def parameter_counts(*models) -> list[int]:
    return [sum(p.numel() for p in m.parameters()) for m in models]


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)


def train_vae(vae, steps: int, batch: int, device: str, seed: int, log=print) -> float:
    """Reconstruct renders (L1 + a small KL term); returns the scaling factor (1 / std of the latents)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        images = world.render({k: v.to(device) for k, v in world.sample(batch, generator).items()}, generator) * 2 - 1
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample(generator=None)).sample
        loss = F.l1_loss(decoded.float(), images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        images = world.render({k: v.to(device) for k, v in world.sample(512, generator).items()}, generator) * 2 - 1
        latents = vae.encode(images).latent_dist.mean
    return float(1.0 / latents.float().std())


def vae_round_trip(vae):
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        with _autocast(str(images.device)):
            return (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample.float() + 1) / 2
    return round_trip


def _caption_pool(tokenizer, count: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`count` subjects with one random caption each (10 % empty), tokenised as the pipeline does (77, padded)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    attrs = world.sample(count, generator)
    captions = ["" if rng.random() < EMPTY_CAPTION_P else world.caption(world.row(attrs, i), rng)
                for i in range(count)]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return attrs, ids


def train_denoiser(unet, text_encoder, vae, tokenizer, *, steps: int, batch: int, lr: float, device: str, seed: int,
                   max_seconds: float | None = None, pool: int = 20000, log=print) -> dict:
    """Train the UNet and the text encoder together from scratch; the EMA weights are loaded into them at the end.
    Returns what was done (steps made, seconds, last loss)."""
    from diffusers import DDPMScheduler

    from trainer.models.tiny import SD15_SCHEDULER_CONFIG

    noise_schedule = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                      if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                               "steps_offset")})
    attrs, ids = _caption_pool(tokenizer, pool, seed)
    attrs = {k: v.to(device) for k, v in attrs.items()}
    ids = ids.to(device)
    scaling = vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    warmup = min(500, steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    ema = [p.detach().clone().float() for p in params]
    generator = torch.Generator().manual_seed(seed + 1)
    device_generator = torch.Generator(device=device).manual_seed(seed + 2)
    unet.train()
    text_encoder.train()
    vae.requires_grad_(False)
    started = time.monotonic()
    loss_value, step = float("nan"), 0
    for step in range(steps):
        pick = torch.randint(pool, (batch,), generator=generator).to(device)
        images = world.render({k: v[pick] for k, v in attrs.items()}, generator)
        with torch.no_grad(), _autocast(device):
            latents = vae.encode(images * 2 - 1).latent_dist.mean.float() * scaling
        noise = torch.randn(latents.shape, generator=device_generator, device=device)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,),
                                  generator=device_generator, device=device)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        with _autocast(device):
            states = text_encoder(ids[pick])[0]
            prediction = unet(noisy, timesteps, states).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            loss_value = loss.item()
            log(f"denoiser step {step + 1}/{steps} loss {loss_value:.4f} ({time.monotonic() - started:.0f} s)")
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            log(f"denoiser stopped at step {step + 1} after {max_seconds:.0f} s (time limit)")
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e.to(p.dtype))
    unet.eval()
    text_encoder.eval()
    return {"steps": step + 1, "seconds": round(time.monotonic() - started, 1), "last_loss": round(loss_value, 4)}


def build(out_dir: Path, *, size: str = "full", device: str = "cpu", seed: int = 0,
          max_denoiser_seconds: float | None = None, log=print) -> dict:
    """Train every part and write the folder; returns what world_model.json records."""
    from diffusers import StableDiffusionPipeline

    cfg = SIZES[size]
    torch.manual_seed(seed)
    unet, vae, text_encoder, tokenizer, scheduler = build_components(size)
    unet, vae, text_encoder = unet.to(device), vae.to(device), text_encoder.to(device)
    info: dict = {"size": size, "seed": seed, "device": device,
                  "parameters": dict(zip(("unet", "vae", "text_encoder"), parameter_counts(unet, vae, text_encoder)))}
    log(f"parameters: {info['parameters']}")
    started = time.monotonic()
    scaling = train_vae(vae, cfg["vae_steps"], cfg["batch"], device, seed, log)
    vae.register_to_config(scaling_factor=scaling)
    info["vae"] = {"steps": cfg["vae_steps"], "scaling_factor": round(scaling, 5),
                   "seconds": round(time.monotonic() - started, 1)}
    info["vae"]["round_trip_l1"] = round(_round_trip_error(vae, device, seed), 4)
    log(f"vae: {info['vae']}")

    started = time.monotonic()
    readers = readers_mod.train_readers(cfg["reader_steps"], batch=cfg["batch"], device=device, seed=seed,
                                        round_trip=vae_round_trip(vae), log=log).cpu()
    info["readers"] = {"steps": cfg["reader_steps"], "seconds": round(time.monotonic() - started, 1),
                       "accuracy_on_renders": readers_mod.accuracy(readers)}
    log(f"readers: {info['readers']}")

    info["denoiser"] = train_denoiser(unet, text_encoder, vae, tokenizer, steps=cfg["unet_steps"], batch=cfg["batch"],
                                      lr=cfg["lr"], device=device, seed=seed, max_seconds=max_denoiser_seconds,
                                      log=log)
    out_dir = Path(out_dir)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device="cpu", dtype=torch.float16 if size == "full" else torch.float32)  # fp16 on disk: half the bytes
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    readers_mod.save_readers(readers, out_dir / READERS_FILE)
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _round_trip_error(vae, device: str, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed + 99)
    images = world.render({k: v.to(device) for k, v in world.sample(256, generator).items()}, generator)
    with torch.no_grad():
        return float((vae_round_trip(vae)(images) - images).abs().mean())


def load_world_pipeline(directory: Path = ASSET_DIR, device: str = "cpu", dtype: str = "fp32"):
    """The world model through the bot's own loader."""
    from trainer.models.loading import load_pipeline

    return load_pipeline(str(directory), device=device, dtype=dtype)


def load_world_readers(directory: Path = ASSET_DIR, device: str = "cpu"):
    """The readers built with the model in `directory`."""
    return readers_mod.load_readers(Path(directory) / READERS_FILE, device)
