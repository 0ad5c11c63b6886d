"""A tiny random Stable Diffusion pipeline, built in-process: for tests and offline smoke runs, never a default.

It has the real component classes, just small, so every code path that runs on the real model runs on it in seconds
on a CPU: SD 1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer) or, with family="sdxl", SDXL's
(a UNet with the `text_time` added conditioning, CLIPTextModel + CLIPTextModelWithProjection, two tokenizers).
Images are 64 px by default.
"""
from __future__ import annotations

import json
from pathlib import Path

# A few real words get their own BPE token, so "the tokenizer already knows this word" can be tested on the tiny
# tokenizer too; everything else falls back to single characters.
KNOWN_WORDS = (
    "a", "an", "the", "of", "photo", "portrait", "man", "woman", "person", "boy", "girl", "dog", "cat", "style",
    "object", "in", "as", "on", "with", "painting", "sid", "jedi", "astronaut", "red", "blue", "green",
)
TINY_RESOLUTION = 64
# The scheduler config SD 1.5 ships with (the tiny model and bench's SD 1.5-sized one use it).
SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
)


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table that CLIP's byte-level BPE uses.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tiny_tokenizer(directory: Path, words=KNOWN_WORDS) -> int:
    """Write a CLIP-style BPE tokenizer (vocab.json, merges.txt) in which each of `words` is one token, everything
    else single characters, and return its vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in words:
        # Apply the merges learnt so far (as BPE will), then add merges that join what is left into one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for left, right in merges:
            i = 0
            while i < len(pieces) - 1:
                if pieces[i] == left and pieces[i + 1] == right:
                    pieces[i:i + 2] = [left + right]
                else:
                    i += 1
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab_tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return len(vocab)


def build_tiny_pipeline(seed: int = 0, tokenizer_dir: Path | None = None, family: str = "sd1"):
    """Return a StableDiffusionPipeline (family "sd1") or StableDiffusionXLPipeline ("sdxl") with tiny random
    weights (deterministic for a seed)."""
    import tempfile

    if family == "sdxl":
        return _build_tiny_sdxl(seed, tokenizer_dir)
    if family != "sd1":
        raise ValueError(f"no tiny model for family {family!r}: sd1 or sdxl")

    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tokenizer_dir or tmp)
        vocab_size = write_tiny_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_clip_config(vocab_size))
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=16, sample_size=TINY_RESOLUTION, **extra)


def _tiny_clip_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          **extra)


TINY_TIME_EMBED_DIM = 8  # SDXL's is 256; the UNet's added embedding takes 6 of these + the pooled text embedding


def _build_tiny_sdxl(seed: int, tokenizer_dir: Path | None):
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tokenizer_dir or tmp)
        vocab_size = write_tiny_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    torch.manual_seed(seed)
    pooled_dim = 32
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL's layout: a plain first block, attention below it (its real blocks have 2 and 10 transformer layers)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # the two encoders' hidden states side by side: 32 + 32
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + pooled_dim,
        norm_num_groups=16,
    )
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE
    text_encoder = CLIPTextModel(_tiny_clip_config(vocab_size))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(vocab_size, projection_dim=pooled_dim))
    # SDXL base ships Euler with the SD 1.x betas; the training noise schedule is built from this config.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def make_tiny_model(directory: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Save the tiny pipeline so `StableDiffusionPipeline.from_pretrained(directory)` (or, for family "sdxl",
    `StableDiffusionXLPipeline.from_pretrained`) loads it."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(seed, family=family)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_sample_photos(directory: str | Path, count: int = 5, size: int = 256, seed: int = 0) -> Path:
    """Made-up "photos" to try training without real ones: random sharp-edged shapes, different enough from each
    other that intake's duplicate and blur checks accept them."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(size), rng.randrange(size)
            w, h = rng.randrange(size // 8, size // 2), rng.randrange(size // 8, size // 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x - w, y - h, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(directory / f"photo{i + 1}.png")
    return directory
