"""Which family a base model belongs to, read from the model itself (never from its name), without torch.

- a diffusers folder (or a hub id's cached snapshot): model_index.json's `_class_name` and components, and for
  `StableDiffusionPipeline` the UNet's cross-attention width (SD 2.x uses the same pipeline class with 1024);
- a single .safetensors file: its header's tensor names (the original Stability layout: SDXL has two text encoders
  under `conditioner.embedders.`, SD 1.x one CLIP under `cond_stage_model.transformer.`);
- a single .ckpt file: the same names, read as bytes from its pickle (nothing is unpickled).

An architecture boothbot does not train yet (SD 2.x, the SDXL refiner, SD3, Flux, ...) raises UnsupportedModel
naming what was found.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from trainer.contract.errors import SetupError
from trainer.contract.families import SD1, SDXL, Family
from trainer.models.loading import ModelSource

SUPPORTED = "boothbot supports Stable Diffusion 1.x and SDXL models (SDXL-based ones such as Pony and Illustrious too)"
# Single-file checkpoints: a tensor-name prefix each architecture has, checked in this order (first match wins).
SINGLE_FILE_SIGNS: tuple[tuple[str, Family | str], ...] = (
    ("conditioner.embedders.1.model.", SDXL),  # CLIP-L (embedders.0) + OpenCLIP-bigG (embedders.1)
    ("conditioner.embedders.0.model.", "an SDXL refiner"),  # bigG alone
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 model"),
    ("text_encoders.", "a Stable Diffusion 3 model"),
    ("double_blocks.", "a Flux model"),
    ("model.diffusion_model.double_blocks.", "a Flux model"),
    ("cond_stage_model.model.", "a Stable Diffusion 2.x model"),  # OpenCLIP-H
    ("cond_stage_model.transformer.", SD1),  # CLIP-L
)
PIPELINE_NAMES = {
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 model",
    "FluxPipeline": "a Flux model",
    "StableCascadeCombinedPipeline": "a Stable Cascade model",
    "PixArtAlphaPipeline": "a PixArt model",
    "KandinskyV22Pipeline": "a Kandinsky model",
}
SD2_CROSS_ATTENTION_DIM = 1024  # OpenCLIP-H's width; SD 1.x uses CLIP-L's 768
CKPT_PREFIX_BYTES = 64 << 20  # a legacy (non-zip) pickle keeps every tensor name before the tensor data


class UnsupportedModel(SetupError):
    """The base model is an architecture boothbot cannot run (yet); the message names what was found."""


def _unsupported(source: ModelSource, found: str) -> UnsupportedModel:
    return UnsupportedModel(f"{source.ref} is {found}, which is not supported yet: {SUPPORTED}. "
                            "Point BOOTHBOT_MODEL (or --model) at one of those")


def detect_family(source: ModelSource) -> Family:
    """The family of the model `source` names; UnsupportedModel for another architecture. A hub id must be in the
    local cache (its model_index.json: `hub_model_index` downloads just that file)."""
    if source.kind == "file":
        return _single_file_family(source)
    directory = Path(source.location) if source.kind == "directory" else None
    if directory is None:
        index_path = _cached_hub_file(source.location, "model_index.json")
        if index_path is None:
            raise SetupError(f"cannot tell which kind of model {source.ref} is: it is not in the local Hugging Face "
                             "cache yet")
        directory = Path(index_path).parent
    return _diffusers_family(source, directory)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _diffusers_family(source: ModelSource, directory: Path) -> Family:
    index = _read_json(directory / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    components = {name for name, value in index.items()
                  if isinstance(value, list) and value and value[0] is not None}
    if class_name in PIPELINE_NAMES:
        raise _unsupported(source, PIPELINE_NAMES[class_name])
    if class_name.startswith("StableDiffusionXL"):
        if {"unet", "text_encoder", "text_encoder_2"} <= components:
            return SDXL
        raise _unsupported(source, "an SDXL refiner" if "text_encoder_2" in components else f"a {class_name}")
    if class_name.startswith("StableDiffusion") and {"unet", "text_encoder", "vae"} <= components:
        unet = _read_json(directory / "unet" / "config.json")
        if unet.get("cross_attention_dim") == SD2_CROSS_ATTENTION_DIM:
            raise _unsupported(source, "a Stable Diffusion 2.x model")
        return SD1
    raise _unsupported(source, f"a {class_name or 'pipeline of unknown class'} "
                               f"(components: {', '.join(sorted(components)) or 'none'})")


def _single_file_family(source: ModelSource) -> Family:
    names = _tensor_names(Path(source.location))
    for prefix, found in SINGLE_FILE_SIGNS:
        if any(name.startswith(prefix) for name in names):
            if isinstance(found, Family):
                return found
            raise _unsupported(source, found)
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise _unsupported(source, f"a checkpoint of an unknown architecture (its tensors start {sample}, ...)")


def _tensor_names(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        with path.open("rb") as f:  # resolve_model checked the header is whole
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return [name for name in header if name != "__metadata__"]
    return _pickled_names(path)


def _pickled_names(path: Path) -> list[str]:
    """The tensor names a .ckpt's pickle mentions, found as bytes: the prefixes above are what we look for."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            data = archive.read(pickles[0]) if pickles else b""
    else:
        with path.open("rb") as f:
            data = f.read(CKPT_PREFIX_BYTES)
    return [prefix for prefix, _ in SINGLE_FILE_SIGNS if prefix.encode() in data]


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def hub_model_index(repo_id: str) -> None:
    """Download a hub model's model_index.json and UNet config (a few hundred bytes) so `detect_family` can answer
    before gigabytes of weights are fetched. Raises what huggingface_hub raises (the caller reports it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hf_hub_download(repo_id, "model_index.json")
    try:
        hf_hub_download(repo_id, "config.json", subfolder="unet")
    except EntryNotFoundError:
        pass
