"""A random-weight pipeline of the exact Stable Diffusion 1.5 architecture, built in-process (benchmarks only).

Speed depends on the architecture, not on the weights, and real checkpoints can't be downloaded where we benchmark,
so the benchmark builds this model in the run. The config is the one ../shared/BENCHMARKS.md pins down (UNet 859.5 M
parameters). The tokenizer is a generated CLIP-style BPE padded to CLIP's 49408 entries: its content doesn't change
speed, only the embedding table's size does.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.models.tiny import SD15_SCHEDULER_CONFIG, write_tiny_tokenizer

CLIP_VOCAB_SIZE = 49408
SD15_RESOLUTION = 512

UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=CLIP_VOCAB_SIZE - 2,
    eos_token_id=CLIP_VOCAB_SIZE - 1,
    pad_token_id=CLIP_VOCAB_SIZE - 1,
)


def write_clip_sized_tokenizer(directory: Path, vocab_size: int = CLIP_VOCAB_SIZE) -> int:
    """Write the tiny BPE tokenizer padded with unreachable filler entries to `vocab_size` (specials last, as CLIP)."""
    write_tiny_tokenizer(directory)
    vocab_path = directory / "vocab.json"
    specials = ("<|startoftext|>", "<|endoftext|>")
    tokens = [t for t in json.loads(vocab_path.read_text(encoding="utf-8")) if t not in specials]
    tokens += [f"<|filler{i}|>" for i in range(vocab_size - len(specials) - len(tokens))]
    tokens += list(specials)
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    return len(tokens)


def build_sd15_pipeline(device: str = "cpu", seed: int = 0, tokenizer_dir: Path | None = None):
    """Return an fp32 StableDiffusionPipeline of the SD 1.5 architecture with random weights, built on `device`.

    Building on the GPU (weights initialised there) takes seconds; on a CPU it takes about a minute.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tokenizer_dir or tmp)
        vocab_size = write_clip_sized_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    assert vocab_size == CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
