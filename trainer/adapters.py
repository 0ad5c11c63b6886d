"""Concept LoRAs on the resident pipeline: a small LRU of loaded peft adapters, switched with `set_adapters`.

Each file version is loaded once (`pipe.load_lora_weights(path, adapter_name=...)`) and stays as a named adapter
until it is evicted; switching concepts only changes which adapters are active and their weights, so the base
weights are never touched or reloaded and A→B→A gives exactly what a fresh A gives.

Adapter names come from the file's content hash ("gen_<hash>"), so two services on one pipeline agree on names, and
an adapter that disappeared behind our back (e.g. someone called `unload_lora_weights`) is simply loaded again.
Adapters whose names don't start with "gen_" (the training engine's) are never deleted here, only deactivated.

Later, for torch.compile / CUDA graphs, diffusers' hotswap (`enable_lora_hotswap` + `load_lora_weights(...,
hotswap=True)`) can replace the weights of one fixed adapter slot in place instead; not done yet.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import set_adapter_layers

from trainer.errors import UserError
from trainer.pnginfo import lora_hash

log = logging.getLogger(__name__)
NAME_PREFIX = "gen_"


@dataclass(frozen=True)
class LoadedAdapter:
    name: str        # the peft adapter name on the pipeline
    path: Path
    short_hash: str  # A1111's LoRA hash (12 hex), also written into the PNG parameters


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


class AdapterCache:
    def __init__(self, pipe, capacity: int = 8):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.pipe = pipe
        self.capacity = capacity
        self._loaded: OrderedDict[tuple, LoadedAdapter] = OrderedDict()  # file key -> adapter, least recent first
        self.loads = 0  # how many times a file was actually read into the pipeline (for tests and logs)

    def present_adapters(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def get(self, path: str | Path, label: str, keep: set[str] = frozenset()) -> LoadedAdapter:
        """The adapter for the LoRA file at `path`, loading it if needed. `label` names it in errors (the token).

        `keep` holds adapter names the current request needs, which eviction must not remove.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"The LoRA file for {label} is missing; its owner may need to train it again.")
        key = _file_key(path)
        entry = self._loaded.get(key)
        if entry is not None and entry.name in self.present_adapters():
            self._loaded.move_to_end(key)
            return entry
        self._loaded.pop(key, None)
        short_hash = lora_hash(path)
        entry = LoadedAdapter(f"{NAME_PREFIX}{short_hash}", path, short_hash)
        if entry.name not in self.present_adapters():
            self._evict(keep | {entry.name})
            self._load(entry, label)
        self._loaded[key] = entry
        return entry

    def _load(self, entry: LoadedAdapter, label: str) -> None:
        try:
            self.pipe.load_lora_weights(str(entry.path), adapter_name=entry.name)
        except Exception as e:
            if entry.name in self.present_adapters():
                self.pipe.delete_adapters([entry.name])
            log.exception("loading LoRA %s for %s failed", entry.path, label)
            raise UserError(f"The LoRA file for {label} could not be loaded ({type(e).__name__}); "
                            "its owner may need to train it again.") from e
        self.loads += 1
        _freeze(self.pipe, {entry.name})

    def _evict(self, keep: set[str]) -> None:
        present = self.present_adapters()
        ours = [key for key, entry in self._loaded.items() if entry.name in present]
        excess = len(ours) + 1 - self.capacity
        for key in ours:
            if excess <= 0:
                break
            entry = self._loaded[key]
            if entry.name in keep:
                continue
            self.pipe.delete_adapters([entry.name])
            del self._loaded[key]
            excess -= 1

    def clear(self) -> None:
        """Delete every adapter this cache loaded."""
        present = self.present_adapters()
        names = [e.name for e in self._loaded.values() if e.name in present]
        if names:
            self.pipe.delete_adapters(names)
        self._loaded.clear()


def _lora_models(pipe):
    for component in getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder")):
        model = getattr(pipe, component, None)
        if model is not None and getattr(model, "peft_config", None):
            yield component, model


def activate(pipe, names: list[str], weights: list[float]) -> None:
    """Make exactly `names` the active adapters (with those weights) on every LoRA-capable model; [] = none."""
    if names:
        for _, model in _lora_models(pipe):
            set_adapter_layers(model, enabled=True)  # undo a disable_lora() someone may have left behind
        pipe.set_adapters(list(names), adapter_weights=list(weights))
        _freeze(pipe, set(names))
        return
    for component, model in _lora_models(pipe):
        if component == "text_encoder":
            set_adapters_for_text_encoder([], model, [])
        else:
            model.set_adapters([], [])


def active_adapters(pipe) -> dict[str, list[str]]:
    """The adapters active on each LoRA-capable model (as the layers see them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    result = {}
    for component, model in _lora_models(pipe):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                result[component] = [] if module.disable_adapters else list(module.active_adapters)
                break
    return result


def _freeze(pipe, names: set[str]) -> None:
    # peft's set_adapter marks the active adapter trainable; ours are for inference only, and a training engine
    # sharing this pipeline must never find them among the parameters that require grad.
    for _, model in _lora_models(pipe):
        for param_name, param in model.named_parameters():
            if param.requires_grad and any(f".{name}." in param_name for name in names):
                param.requires_grad_(False)
