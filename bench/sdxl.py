"""A random-weight pipeline of the exact SDXL base architecture, built in-process (benchmarks only), as bench/sd15.py
does for SD 1.5: speed and memory depend on the architecture, not on the weights.

UNet 2,567.5 M parameters (the issue's reference figures are on this architecture), CLIP-L + OpenCLIP-bigG text
encoders, SDXL's VAE config (fp32 decode: `force_upcast`), CLIP-sized tokenizers (the embedding tables' size is what
matters, bench/sd15.write_clip_sized_tokenizer).
"""
from __future__ import annotations

from pathlib import Path

from bench.sd15 import CLIP_VOCAB_SIZE, VAE_CONFIG, write_clip_sized_tokenizer

SDXL_RESOLUTION = 1024

UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 × 256 + 1280 (the pooled bigG embedding)
    norm_num_groups=32,
)
SDXL_VAE_CONFIG = {**VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_CLIP_COMMON = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=CLIP_VOCAB_SIZE - 2,
                    eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1)
CLIP_L_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu", **_CLIP_COMMON)
BIGG_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, **_CLIP_COMMON)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        steps_offset=1, timestep_spacing="leading")


def build_sdxl_pipeline(device: str = "cpu", seed: int = 0, tokenizer_dir: Path | None = None):
    """Return an fp32 StableDiffusionXLPipeline of the SDXL base architecture with random weights, built on `device`
    (seconds on a GPU; minutes and ~14 GB of memory on a CPU)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tokenizer_dir or tmp)
        write_clip_sized_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_CONFIG))
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
