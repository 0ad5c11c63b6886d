"""A random-weight pipeline of the exact SDXL base architecture, built in-process (benchmarks only).

Speed depends on the architecture, not on the weights (see bench/sd15.py). The configs are SDXL base 1.0's: a UNet of
2,567.5 M parameters with the `text_time` added conditioning, CLIP-L and OpenCLIP-bigG (with projection) text
encoders, the SD VAE with SDXL's scaling factor and `force_upcast` (its fp16 decode overflows). Both tokenizers are
the generated CLIP-sized BPE of bench/sd15.py.
"""
from __future__ import annotations

from pathlib import Path

from bench.sd15 import CLIP_VOCAB_SIZE, TEXT_CONFIG, VAE_CONFIG, write_clip_sized_tokenizer

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
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE_CONFIG = {**VAE_CONFIG, "sample_size": SDXL_RESOLUTION, "scaling_factor": 0.13025, "force_upcast": True}
TEXT_2_CONFIG = {**TEXT_CONFIG, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        steps_offset=1, timestep_spacing="leading", interpolation_type="linear")


def build_sdxl_pipeline(device: str = "cpu", seed: int = 0, tokenizer_dir: Path | None = None):
    """Return an fp32 StableDiffusionXLPipeline of the SDXL base architecture with random weights, built on `device`
    (seconds on a GPU; minutes and ~14 GB of memory on a CPU)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tokenizer_dir or tmp)
        vocab_size = write_clip_sized_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    assert vocab_size == CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_CONFIG))
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
