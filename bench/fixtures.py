"""What a benchmark run needs on disk: the base model, a member's photos and members' LoRAs (all synthetic)."""
from __future__ import annotations

from pathlib import Path

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def write_photos(directory: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Write `count` prepared training photos (NNN.png, square, as intake leaves them): smooth colour fields + noise."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(6 * xs + 4 * ys + p) for p in phase], axis=-1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        path = directory / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_random_loras(pipe, directory: Path, count: int, rank: int, seed: int = 0,
                       text_encoder: bool = True) -> list[Path]:
    """Save `count` different random LoRAs for `pipe` in the diffusers format `load_lora_weights` reads.

    They have the shape `train_dreambooth_lora.py` gives (UNet attention projections, text-encoder attention
    projections: both encoders of an SDXL pipeline), with non-zero up weights so that they really change the output.
    `pipe` is left without adapters.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    models = {"unet": (pipe.unet, UNET_LORA_TARGETS)}
    if text_encoder:
        models |= {name: (getattr(pipe, name), TEXT_LORA_TARGETS) for name in ("text_encoder", "text_encoder_2")
                   if getattr(pipe, name, None) is not None}
    for model, targets in models.values():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name="bench")
    paths = []
    try:
        for i in range(count):
            layers = {}
            for name, (model, _) in models.items():
                state = get_peft_model_state_dict(model, adapter_name="bench")
                state = {k: (torch.randn(v.shape, generator=generator) * (0.02 if "lora_B" in k else 1 / rank))
                         for k, v in state.items()}
                layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
            out = directory / f"member{i}"
            pipe.save_lora_weights(str(out), **layers)
            paths.append(out / "pytorch_lora_weights.safetensors")
    finally:
        pipe.unet.delete_adapters("bench")
        for name, (model, _) in models.items():
            if name != "unet":
                model.delete_adapter("bench")
    return paths
