"""Base model: where it comes from (hub id, local diffusers directory, single checkpoint file), device and dtype."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.contract.errors import SetupError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ELSEWHERE = "or point BOOTHBOT_MODEL (or --model) at a local copy"


class ModelNotFound(SetupError, ValueError):
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
        missing = _missing_components(path)
        if missing:
            raise ModelNotFound(f"{path.resolve()}: model_index.json lists {', '.join(missing)} but the folder(s) are "
                                "missing; save the model again with pipe.save_pretrained")
        return ModelSource(ref, "directory", str(path), True, f"local diffusers directory {path.resolve()}")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFound(f"{ref} is a file but not a .safetensors or .ckpt checkpoint")
        if path.suffix.lower() == ".safetensors":
            _check_safetensors(path, ref)
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


def _missing_components(directory: Path) -> list[str]:
    try:
        index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["(model_index.json is unreadable)"]
    return [name for name, value in index.items()
            if isinstance(value, list) and value and value[0] is not None and not (directory / name).is_dir()]


def _check_safetensors(path: Path, ref: str) -> None:
    """Read the header only: a cut-off download or a saved error page fails here, not deep inside diffusers."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise ValueError("no header")
            header = json.loads(f.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except OSError as e:
        raise ModelNotFound(f"cannot read {ref} ({e.strerror or e}); make it readable for this user") from e
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ModelNotFound(f"{ref} is not a readable .safetensors file (its header is damaged or missing): download "
                            f"it again, {ELSEWHERE}") from e
    if 8 + length + end > size:
        raise ModelNotFound(f"{ref} is cut off ({size} of {8 + length + end} bytes): download it again, {ELSEWHERE}")


def require_model(ref: str) -> ModelSource:
    """resolve_model, and a SetupError for a hub id that is not downloaded while HF_HUB_OFFLINE forbids it."""
    source = resolve_model(ref)
    if source.kind == "hub" and not source.cached:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise SetupError(hub_unreachable_message(source, offline=True))
    return source


def hub_unreachable_message(source: ModelSource, *, offline: bool, reason: str = "") -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if offline else f"the hub at {constants.ENDPOINT} cannot be reached ({reason})"
    fix = ("unset HF_HUB_OFFLINE for the first start" if offline else
           "check this machine's internet connection (and any proxy or HF_ENDPOINT setting)")
    if source.kind == "file":
        return (f"{source.ref} is a single checkpoint file and loading it needs configuration files from the Hugging "
                f"Face hub that are not in the local cache, and {why}; {fix}, or use a diffusers folder instead")
    return (f"the base model {source.ref} is not in the local Hugging Face cache and cannot be downloaded: {why}; "
            f"{fix}, {ELSEWHERE}")


def _hub_failure(error: OSError) -> str | None:
    """When `error` says files were neither in the cache nor downloadable, why the hub failed: its innermost cause,
    e.g. "[Errno 111] Connection refused". None when the hub was not the problem."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not any(isinstance(e, LocalEntryNotFoundError) for e in (error, error.__cause__, error.__context__)):
        return None
    innermost = error
    for _ in range(20):  # a bound, in case a library ever chains an error to itself
        if innermost.__cause__ is None:
            break
        innermost = innermost.__cause__
    return str(innermost)


def _no_such_repository(error: BaseException) -> bool:
    """The hub answered, and said it has no such model (a typo, or a private or gated one without a login)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    return isinstance(error.__cause__, RepositoryNotFoundError)


def _hub_snapshot_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SetupError(f"device {requested} was asked for but torch sees no CUDA GPU "
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


def _not_on_hub_message(source: ModelSource) -> str:
    from huggingface_hub import constants

    return (f"the Hugging Face hub at {constants.ENDPOINT} has no model {source.ref} (or it is private or gated): "
            "check the spelling of BOOTHBOT_MODEL (or --model); a private or gated model needs `hf auth login` first")


def _fetch_model_index(source: ModelSource) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from trainer.models.detection import hub_model_index

    try:
        hub_model_index(source.location)
    except RepositoryNotFoundError as error:
        raise SetupError(_not_on_hub_message(source)) from error
    except OSError as error:
        reason = _hub_failure(error) or str(error)
        raise SetupError(hub_unreachable_message(source, offline=constants.HF_HUB_OFFLINE, reason=reason)) from error


def load_pipeline(ref: str, device: str = "auto", dtype: str = "auto", local_files_only: bool = False):
    """Load the pipeline of the model's family (trainer/models/detection.py: StableDiffusionPipeline or
    StableDiffusionXLPipeline) from any supported source onto `device` in the chosen dtype, SDPA attention.

    Raises SetupError when the model is missing, unreadable, of an unsupported architecture, or needs the Hugging
    Face hub while it cannot be reached.
    """
    source = require_model(ref)  # before importing diffusers: a wrong path fails in a moment
    from huggingface_hub import constants

    from trainer.models.detection import detect_family
    from trainer.models.family import engine_for

    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    if source.kind == "hub" and not source.cached and not local_files_only:
        _fetch_model_index(source)  # a few hundred bytes: an unsupported model is refused before gigabytes
    try:
        family = engine_for(detect_family(source))
        pipeline_class = family.diffusers_class()
        common = dict(dtype=torch_dtype)
        if family.name == "sd1":
            common.update(safety_checker=None, requires_safety_checker=False)
        if source.kind == "file":
            pipe = pipeline_class.from_single_file(source.location, **common)
        else:
            pipe = pipeline_class.from_pretrained(source.location, local_files_only=local_files_only, **common)
    except OSError as error:  # diffusers reports "not cached and the hub failed" as OSError, the hub's error inside
        reason = _hub_failure(error)
        if reason is None:
            raise
        if _no_such_repository(error):
            raise SetupError(_not_on_hub_message(source)) from error
        raise SetupError(hub_unreachable_message(source, offline=constants.HF_HUB_OFFLINE, reason=reason)) from error
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    # Inference weights: nothing trainable (from_pretrained leaves requires_grad on). Training marks its own LoRA.
    for component in (pipe.unet, pipe.vae, *family.text_encoder_modules(pipe)):
        component.requires_grad_(False)
    return pipe.to(device)
