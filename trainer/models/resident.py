"""The base models a worker keeps loaded: loaded on first need, the least recently used one evicted when the
setting's count is reached or the GPU's free memory (measured, not guessed) would not hold the next one.

The worker holds one `ResidentModels`; a job asks `get(name)` for the pipeline of the model its params name. Each
resident model keeps its own GenerationService (its LoRA cache and CUDA graphs belong to that pipeline).
"""
from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.contract.errors import SetupError, UserError

HEADROOM = 1.15  # a load also needs room for its temporaries beyond the weights it keeps
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


class UnknownModel(UserError):
    """A job names a base model this worker was not given."""


@dataclass
class Resident:
    name: str
    ref: str
    pipe: object
    family: str
    footprint: int  # bytes of device memory the load took (0 when not measured: CPU)
    last_used: float = field(default_factory=time.monotonic)
    generation: object | None = None  # its GenerationService, made at its first /imagine


def parse_catalog(raw: str) -> dict[str, str]:
    """`name=ref,name=ref` (the worker's --models) as a dict."""
    catalog = {}
    for part in raw.split(","):
        name, _, ref = part.partition("=")
        if name.strip() and ref.strip():
            catalog[name.strip()] = ref.strip()
    return catalog


class ResidentModels:
    def __init__(self, catalog: dict[str, str], *, device: str, dtype: str, keep: int = 1,
                 on_change: Callable[[], None] | None = None,
                 free_memory: Callable[[], int | None] | None = None):
        self.catalog = dict(catalog)
        self.device = device
        self.dtype = dtype
        self.keep = max(1, keep)
        self.on_change = on_change  # told of every load and eviction
        self._free_memory = free_memory or self.measure_free_memory  # replaceable: CPU tests have no GPU to fill
        self._resident: dict[str, Resident] = {}
        self._measured: dict[str, int] = {}  # footprints of earlier loads, kept after an eviction
        self._problems: dict[str, str] = {}  # why a model cannot be used (found at start or at a failed load)
        self._families: dict[str, str] = {}
        self._native_sides: dict[str, int] = {}

    # --- facts ------------------------------------------------------------------------------------------------------
    def survey(self) -> None:
        """Detect every model's family from its files (torch-free, reads headers only); a model that cannot be
        used gets its problem recorded, and jobs naming it fail with that message."""
        from trainer.models.detection import detect_family
        from trainer.models.loading import resolve_model

        for name, ref in self.catalog.items():
            if name in self._families:
                continue
            try:
                source = resolve_model(ref)
                family = detect_family(source)
            except SetupError as error:
                self._problems[name] = str(error)
                continue
            self._families[name] = family.name
            self._native_sides[name] = (_configured_native_side(Path(source.location))
                                        if source.kind == "directory" else None) or family.native_side

    def facts(self) -> list[dict]:
        """One entry per model, for the `ready` and `models` events: name, ref, family, resident, problem."""
        return [{"name": name, "ref": ref, "family": self._families.get(name),
                 "native_side": self._native_sides.get(name), "resident": name in self._resident,
                 "problem": self._problems.get(name)}
                for name, ref in self.catalog.items()]

    def resident_names(self) -> list[str]:
        """The loaded models, least recently used first."""
        return [r.name for r in sorted(self._resident.values(), key=lambda r: r.last_used)]

    # --- loading ----------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Resident:
        """The loaded model `name`, loading it (and evicting others) when it is not resident."""
        if name not in self.catalog:
            raise UnknownModel(f"This bot has no base model called {name}; an admin can list them with "
                               "`/queue admin models`.")
        resident = self._resident.get(name)
        if resident is None:
            resident = self._load(name)
        resident.last_used = time.monotonic()
        return resident

    def _load(self, name: str) -> Resident:
        self._make_room(name)
        before = self._allocated()
        try:
            pipe = self._load_pipe(name)
        except SetupError as error:
            self._problems[name] = str(error)
            raise
        except Exception as error:  # noqa: BLE001 - an out-of-memory load: free everything else and try once more
            if not _out_of_memory(error) or not self._resident:
                raise
            _log(f"out of memory loading {name}; evicting every other model and trying again")
            self.evict_all()
            before = self._allocated()
            pipe = self._load_pipe(name)
        from trainer.generation.service import native_side
        from trainer.models.family import family_of

        footprint = max(0, self._allocated() - before)
        if footprint:
            self._measured[name] = footprint
        resident = Resident(name, self.catalog[name], pipe, family_of(pipe).name, footprint)
        self._families[name] = resident.family
        self._native_sides[name] = native_side(pipe)
        self._problems.pop(name, None)
        self._resident[name] = resident
        _log(f"loaded base model {name} ({self.catalog[name]})"
             + (f", {footprint / 2**30:.1f} GiB" if footprint else ""))
        self._changed()
        return resident

    def _load_pipe(self, name: str):
        from trainer.models.loading import load_pipeline

        return load_pipeline(self.catalog[name], self.device, self.dtype)

    def _make_room(self, name: str) -> None:
        """Evict least recently used models until one more fits the count and the measured free memory."""
        while len(self._resident) >= self.keep:
            self._evict(self.resident_names()[0], "the resident-model limit is reached")
        need = self.expected_bytes(name)
        while self._resident and need and (free := self._free_memory()) is not None and free < need:
            self._evict(self.resident_names()[0], f"{name} needs about {need / 2**30:.1f} GiB of free GPU memory")

    def expected_bytes(self, name: str) -> int:
        """What loading `name` takes: its measured footprint from an earlier load, else the size of its weights on
        disk; with headroom for the load's temporaries."""
        known = self._measured.get(name) or _weights_on_disk(self.catalog[name])
        return int(known * HEADROOM)

    def measure_free_memory(self) -> int | None:
        """Free device memory, counting what torch's allocator holds unused; None off CUDA (the count limits)."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _allocated(self) -> int:
        if not self.device.startswith("cuda"):
            return 0
        import torch

        return torch.cuda.memory_allocated(self.device)

    def generations(self) -> list:
        """The resident models' GenerationServices (those made so far)."""
        return [r.generation for r in self._resident.values() if r.generation is not None]

    def release_generation_memory(self) -> None:
        """What every resident model's generation keeps between requests (CUDA graph pools, LoRA copies), given back
        before a training needs the memory; the next /imagine makes it again."""
        for resident in self._resident.values():
            if resident.generation is not None:
                resident.generation.release_memory()

    # --- evicting ---------------------------------------------------------------------------------------------------
    def _evict(self, name: str, why: str) -> None:
        resident = self._resident.pop(name)
        if resident.generation is not None:
            resident.generation.release_memory()
            resident.generation.stop_compiling()  # its second copy of the UNet on the GPU goes too
        resident.generation = resident.pipe = None  # the worker dropped its references before asking for another
        _release_memory(self.device)
        _log(f"evicted base model {name}: {why}")
        self._changed()

    def evict_all(self) -> None:
        for name in list(self._resident):
            self._evict(name, "out of memory while loading another model")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _configured_native_side(directory: Path) -> int | None:
    """A diffusers folder's training resolution from its configs, as generation.service.native_side computes it
    from the loaded pipeline: the UNet's sample size times the VAE's downscaling."""
    import json

    try:
        unet = json.loads((directory / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((directory / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _weights_on_disk(ref: str) -> int:
    """Bytes of a local model's weight files (0 for a hub id: its footprint is measured at its first load)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return 0


def _out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _log(text: str) -> None:
    print(f"worker: {text}", file=sys.stderr, flush=True)
