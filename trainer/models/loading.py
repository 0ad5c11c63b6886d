"""Base model: where it comes from (hub id, local diffusers directory, single checkpoint file), device and dtype."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(ValueError):
    """The base model reference resolves to nothing usable; the message says what was tried."""


@dataclass(frozen=True)
class ModelSource:
    ref: str
    kind: str  # "directory" | "file" | "hub"
    location: str  # the directory or file to load, or the hub id
    cached: bool  # False only for a hub id not downloaded yet
    detail: str  # one line for `python -m bot check` and logs


def resolve_model(ref: str) -> ModelSource:
    """Say what `ref` is without loading it. Raises ModelNotFound for a path that does not exist or is unusable."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(f"{ref} is a directory but has no model_index.json: it is not a diffusers model "
                                "(save one with pipe.save_pretrained, or point at a .safetensors file)")
        return ModelSource(ref, "directory", str(path), True, f"local diffusers directory {path.resolve()}")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFound(f"{ref} is a file but not a .safetensors or .ckpt checkpoint")
        size_gb = path.stat().st_size / 1e9
        return ModelSource(ref, "file", str(path), True, f"single checkpoint file {path.resolve()} ({size_gb:.1f} GB)")
    looks_like_path = ref.startswith((".", "/", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES or ref.count("/") > 1
    if looks_like_path or not _HUB_ID.match(ref):
        raise ModelNotFound(f"{ref} does not exist: give a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, "
                            "a local diffusers directory, or a .safetensors/.ckpt file")
    cached = _hub_snapshot_cached(ref)
    detail = (f"hub id {ref}, in the local Hugging Face cache" if cached else
              f"hub id {ref}, not downloaded yet: the first start downloads it (about 4-5 GB for SD 1.5)")
    return ModelSource(ref, "hub", ref, cached, detail)


def _hub_snapshot_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested} was asked for but torch sees no CUDA GPU "
                               f"(torch {torch.__version__}); install a CUDA build of torch or use BOOTHBOT_DEVICE=cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str = "auto"):
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested != "auto":
        return named[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def load_pipeline(ref: str, device: str = "auto", dtype: str = "auto", local_files_only: bool = False):
    """Load a StableDiffusionPipeline from any supported source onto `device` in the chosen dtype, SDPA attention."""
    from diffusers import StableDiffusionPipeline

    source = resolve_model(ref)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    common = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    if source.kind == "file":
        pipe = StableDiffusionPipeline.from_single_file(source.location, **common)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(source.location, local_files_only=local_files_only, **common)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    # Inference weights: nothing trainable (from_pretrained leaves requires_grad on). Training marks its own LoRA.
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.requires_grad_(False)
    return pipe.to(device)
