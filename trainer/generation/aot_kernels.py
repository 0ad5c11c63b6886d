"""The UNet forward compiled ahead of time, where no member waits for it: the worker's side.

A compiled UNet (inductor's fused kernels) makes an /imagine 1.5x faster on an H200 (docs/BENCHMARKS.md), but
compiling takes about a minute per shape, which must not happen on the job thread. So:
- every forward shape generation serves is noted (`get` of a shape without a package), with the same forward at
  the largest batch the bot makes (a burst of members);
- a separate process (trainer/generation/aot_compile.py, niced) compiles the noted shapes one by one into
  `<data>/cache/aot/<architecture>/<shape>.pt2`; the architecture key covers the UNet's config, dtype, memory format,
  GPU and library versions, so base models of one architecture share packages and a restart finds them;
- the compiling process loads and checks each package before declaring it finished: loading one has crashed the
  loading process (SD 1.5 on an H200, torch 2.11), and that must not be the worker;
- when the worker is idle it `adopt`s finished packages: loads each and points its weights at the live UNet's own
  tensors (`user_managed`: no copy, and LoRAs folded into the weights in place are seen), after checking that every
  weight's shape, dtype and strides are what the package was compiled for. torch's loader first works out this
  machine's CPU vector ISA, once per process, by compiling and loading test programs: on the H200 the first load
  took ~50 s. A thread does that when the kernels are made, and idle moments adopt only once it is done, so no
  member (and no start) waits behind it;
- trainer/generation/fast_unet.py then captures its CUDA graph around the compiled forward instead of the eager one;
- folders that no worker of this installation can use again (compiled by another torch or diffusers, after an
  upgrade) are removed when kernels are made (`prune_stale`): each is a few hundred MB.

Two kinds of compiled forward: the bare UNet (no adapter active: single requests, whose LoRAs are folded into the
weights) and the UNet with generation's mixed-LoRA slot (trainer/generation/lora_slots.py: members' different LoRAs
in one batch), whose shape names the slot's layout (rank, layers) and which also reads the slot's weights and takes
its mask. A slotted package waits unbound while the UNet holds no slot of its layout (after a restart, until the
first mixed batch makes it) and serves only once an idle moment checked it against the eager slot. While any other
adapter is active (a training's) the eager forward runs as before.

Weights bound by reference are never freed (torch 2.13's AOTInductor leaks the tensor handle it makes for each
user-managed constant, pytorch/pytorch#194480). Harmless for the resident UNet's own weights, which live as long as
the worker; so nothing may replace them: packages are bound again only when the bound tensors really changed, the
UNet is marked (`WEIGHTS_BOUND_ATTR`) so that a training keeps its memory layout instead of re-allocating every
weight (trainer/training/lora_scope.py), and `auto` stays off for a worker that may evict its base model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from trainer.contract.files import write_text_atomic
from trainer.generation.aot_shapes import (PREFIX, WEIGHTS_BOUND_ATTR, ForwardShape, SlotLayout, architecture,
                                          architecture_text, channels_last, dtype_name, inputs_in_layout, key_of)
from trainer.generation.lora_slots import SLOT_NAME, live_slot_layout

AOT_CACHE = Path("cache") / "aot"  # under the bot's data directory
FACTS_FILE = "architecture.info"  # in each architecture's folder: the facts its key hashes (not *.json: packages)
STALE_AFTER_S = 24 * 3600  # a folder of other versions is removed once nothing was written to it for this long
SETTINGS = ("auto", "on", "off")
# auto: where the compiling process (a second copy of the UNet on the GPU, ~2.5 GB for SD 1.5, ~6 GB for SDXL)
# fits beside the service and a training: the GPUs that train SD 1.x at batch 4, and SDXL where it trains `fast`.
AUTO_MIN_GIB = {"sd1": 22.0, "sdxl": 40.0}


def compiles_ahead(setting: str, pipe, *, may_evict: bool = False) -> bool:
    """Whether generation on `pipe` compiles its UNet forward ahead of time under the worker's --compile-ahead.
    `may_evict`: the worker may unload this model for another, whose weights the bound packages would keep (above)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown compile-ahead setting {setting!r}: one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return setting == "on"
    if may_evict:
        return False
    from trainer.models.family import family_of
    from trainer.training.memory import total_gib

    device = pipe.unet.device
    return device.type == "cuda" and total_gib(device) >= AUTO_MIN_GIB.get(family_of(pipe).name, AUTO_MIN_GIB["sdxl"])


def live_constants(unet, slot: SlotLayout | None = None) -> dict[str, torch.Tensor]:
    """The tensors a compiled forward reads, under the names its code uses. The bare UNet's: its own weights and
    buffers; peft's wrapped layers keep the base weight at `<layer>.base_layer.weight`, the bare UNet at
    `<layer>.weight`; adapters' own weights are left out. With `slot` (the UNet with generation's slot): the layers
    holding the slot keep `base_layer`, and the slot's own weights are in too (other adapters' still are not)."""
    held = set(slot.targets) if slot is not None else set()
    tensors = {}
    for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
        if ".lora_" in name:
            if held and (f".lora_A.{SLOT_NAME}." in name or f".lora_B.{SLOT_NAME}." in name):
                tensors[PREFIX + name] = tensor
            continue
        layer, wrapped, rest = name.partition(".base_layer.")
        if wrapped and layer not in held:
            name = f"{layer}.{rest}"
        tensors[PREFIX + name] = tensor
    return tensors


def prune_stale(cache_root: Path, facts: dict, *, now: float | None = None) -> list[Path]:
    """Remove the architecture folders under `cache_root` that this installation cannot use again: their packages were
    compiled by another torch or diffusers than `facts` name (this process's `architecture()`), or by a version of
    boothbot that did not record its facts (before 2026-12-03: a base model served since then has recorded them, and
    one not served since compiles its shapes again, where nobody waits). Only folders nothing was written to for
    STALE_AFTER_S: a worker that just made its folder has not written its facts yet, and one of another installation
    sharing the data directory (during an upgrade) may be compiling into it. Folders of other base models, dtypes or
    GPUs of the same versions stay: another worker sharing the data directory may use them. Returns those removed."""
    removed, now = [], time.time() if now is None else now
    if not cache_root.is_dir():
        return removed
    for folder in sorted(cache_root.iterdir()):
        if not (folder.is_dir() and _is_architecture_key(folder.name)):
            continue
        try:
            written = max([folder.stat().st_mtime] + [entry.stat().st_mtime for entry in folder.iterdir()])
        except OSError:  # removed meanwhile by another worker
            continue
        if now - written < STALE_AFTER_S:
            continue
        try:
            recorded = json.loads((folder / FACTS_FILE).read_text())
        except FileNotFoundError:
            recorded = {}
        except (OSError, ValueError):  # unreadable: leave it
            continue
        if not isinstance(recorded, dict):
            continue
        if all(recorded.get(name) == facts[name] for name in ("torch", "diffusers")):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _is_architecture_key(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def load_package(path: Path, device: torch.device):
    """A compiled forward's package, loaded for `device` as the worker runs it. Single-threaded: the default runner's
    threading makes a CUDA graph capture fail ("operation not permitted when stream is capturing",
    pytorch/pytorch#148601); the job thread is the only caller anyway."""
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)


def bind_by_reference(model, live: dict[str, torch.Tensor], needed: list[str]) -> None:
    """Point the package's constants `needed` at the live tensors themselves (no copy)."""
    model.load_constants({fqn: live[fqn] for fqn in needed}, check_full_update=True, user_managed=True)


def layout_problem(expected: dict[str, list], live: dict[str, torch.Tensor], needed: list[str]) -> str | None:
    """Why the live tensors cannot stand in for the compiled constants, or None. Every live tensor must be one of
    them: one the compiled code does not take would have had its compile-time value baked in."""
    baked = sorted(set(live) - set(needed))
    if baked:
        return f"it does not read {', '.join(baked[:3])} from the live UNet"
    for name in needed:
        tensor = live.get(name)
        if tensor is None:
            return f"the live UNet has no {name}"
        if name not in expected:
            return f"the package does not describe {name}"
        shape, stride, dtype = expected[name]
        found = [list(tensor.shape), list(tensor.stride()), dtype_name(tensor.dtype)]
        if found != [shape, stride, dtype]:
            return f"{name} is {found}, compiled for {[shape, stride, dtype]}"
    return None


class AotKernels:
    """Compiled forwards for one UNet: which exist, which are wanted, and the process that compiles them."""

    def __init__(self, unet, cache_dir: Path, *, batch_rows: tuple[int, ...] = (), python: str = sys.executable,
                 planned_slot=lambda: None):
        self.unet = unet
        self.facts = architecture(unet)  # what this folder's packages are compiled for
        self.dir = Path(cache_dir).resolve() / key_of(self.facts)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / FACTS_FILE, architecture_text(self.facts))  # before pruning
        for stale in prune_stale(self.dir.parent, self.facts):
            _tell(f"removed the compiled UNet forwards in {stale}: made for another torch or diffusers")
        self.channels_last = self.facts["channels_last"]
        self.batch_rows = batch_rows  # forwards also wanted at these batch sizes when a shape is first served
        # The layout generation's mixed-LoRA slot has or will have (LoraSlots.planned_layout), or None: a burst of
        # members' different concepts at the largest batch is also wanted when a shape is first served.
        self.planned_slot = planned_slot
        self.python = python
        self.loaded: dict[str, object] = {}   # shape name -> the loaded package, bound to the live weights
        self.shapes: dict[str, ForwardShape] = {}  # shape name -> the shape of each loaded package
        self.refused: dict[str, str] = {}     # shape name -> why it is not used
        self.unbound: set[str] = set()        # loaded, but the live weights' layout does not fit it now
        self.checked: set[str] = set()        # loaded and checked against the eager forward in this process
        self._layouts: dict[str, dict] = {}   # shape name -> the constants' layout it was compiled for
        self._bound_to: dict[str, tuple] = {} # shape name -> what its constants point at (data_ptr, strides)
        self.wanted: dict[str, ForwardShape] = {}
        self.calls = 0            # forwards run compiled
        self.compiles_started = 0
        self._process: subprocess.Popen | None = None
        self._asked: list[str] = []  # the shapes the last compiling process was started for
        self.loader_ready = threading.Event()
        threading.Thread(target=self._prepare_loader, name="aot-loader", daemon=True).start()

    # --- serving -------------------------------------------------------------------------------------------------
    def get(self, shape: ForwardShape, *, unchecked: bool = False):
        """The compiled forward for `shape`, or None; one not checked against the eager forward yet only with
        `unchecked` (the check itself). The shape (and its largest batch) is noted for the compiling process where
        it has no package."""
        self.want(shape)
        if shape.name in self.unbound or not (unchecked or shape.name in self.checked):
            return None
        return self.loaded.get(shape.name)

    def run(self, model, sample, timestep, hidden, added: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run a compiled forward; `mask`: the slot's, for a forward compiled with the slot (and only then)."""
        self.calls += 1
        inputs = inputs_in_layout(sample, timestep, hidden, added, channels_last=self.channels_last)
        return model(*inputs) if mask is None else model(*inputs, mask)

    def want(self, shape: ForwardShape) -> None:
        shapes = [shape.with_batch(rows) for rows in (shape.sample[0], *self.batch_rows)]
        if shape.slot is None and self.batch_rows:
            slot = self.planned_slot()
            if slot is not None:
                shapes.append(dataclasses.replace(shape.with_batch(max(self.batch_rows)), slot=slot))
        for wanted in shapes:
            name = wanted.name
            if name not in self.wanted and name not in self.loaded and name not in self.refused:
                self.wanted[name] = wanted

    def rebind(self) -> None:
        """The UNet's parameters changed (layers wrapped or unwrapped by adapters, or weights re-allocated): point
        every package at the live tensors where they are not those already bound. One the live layout does not fit
        waits unused until it does; an error binding it only makes it wait too (a request never fails here)."""
        live = LiveConstants(self.unet)
        for name, model in self.loaded.items():
            try:
                problem = self._bind(name, model, live)
            except Exception as exc:  # noqa: BLE001 - speed is at stake, not the request
                problem = f"binding failed: {exc}"
            if problem and name not in self.unbound:
                _tell(f"compiled UNet forward {name} unused while {problem}")
                self.unbound.add(name)
            elif not problem:
                self.unbound.discard(name)

    # --- adopting finished packages ---------------------------------------------------------------------------
    def _prepare_loader(self) -> None:
        """What torch's loader works out once per process before the first package (above), off the job thread."""
        try:
            from torch._inductor.codecache import get_device_information

            get_device_information(self.unet.device.type)
        except Exception as exc:  # noqa: BLE001 - the first load then does it itself
            _tell(f"preparing to load compiled forwards failed: {type(exc).__name__}: {exc}")
        finally:
            self.loader_ready.set()

    def adopt(self) -> list[ForwardShape]:
        """Load every finished package not loaded yet; returns the shapes that became compiled. Nothing until the
        loader is prepared: a later idle moment adopts them (a starting worker does not wait: it is ready sooner)."""
        if not self.dir.is_dir():
            return []
        finished = [path for path in sorted(self.dir.glob("*.json"))
                    if path.stem not in self.loaded and path.stem not in self.refused]
        if finished and not self.loader_ready.is_set():
            return []
        adopted, live = [], LiveConstants(self.unet)
        for meta_path in finished:
            shape = self._load(meta_path.stem, meta_path, live)
            if shape is not None:
                adopted.append(shape)
        for failed in self.dir.glob("*.failed"):
            if failed.stem not in self.refused and failed.stem not in self.loaded:  # another worker's, for a shape
                reason = (failed.read_text(errors="replace").strip().splitlines() or [""])[0]  # this one has: keep it
                self.refuse(failed.stem, f"it could not be compiled or checked: {reason[:300]} (see {failed})")
        return adopted

    def _load(self, name: str, meta_path: Path, live: "LiveConstants") -> ForwardShape | None:
        try:
            meta = json.loads(meta_path.read_text())
            shape = ForwardShape.from_json(meta["shape"])
            self._layouts[name] = meta["constants"]
            started = time.monotonic()
            model = load_package(self.dir / f"{name}.pt2", self.unet.conv_in.weight.device)
            self.shapes[name] = shape
            waits = live.slot_problem(shape)  # compiled for a slot the UNet does not hold now: it may again
            problem = None if waits else self._bind(name, model, live)
        except Exception as exc:  # noqa: BLE001 - a broken package costs speed, never a job
            problem = f"it could not be loaded: {exc}"
        if problem:
            self.refuse(name, problem)
            return None
        _tell(f"compiled UNet forward {name} loaded in {time.monotonic() - started:.1f} s"
              + (f"; unused while {waits}" if waits else ""))
        self.loaded[name] = model
        self.wanted.pop(name, None)
        if waits:
            self.unbound.add(name)
        return shape

    def serving(self) -> dict[str, ForwardShape]:
        """The loaded packages that fit the live weights now, by name."""
        return {name: self.shapes[name] for name in self.loaded if name not in self.unbound}

    def in_use(self, shape: ForwardShape) -> None:
        """`shape`'s package passed the check against the eager forward: it serves from now on (said in the bot's
        log)."""
        self.checked.add(shape.name)
        _tell(f"compiled UNet forward in use for {shape.describe()}")

    def _bind(self, name: str, model, live: "LiveConstants") -> str | None:
        shape = self.shapes[name]
        problem = live.slot_problem(shape)
        if problem is not None:
            return problem
        live = live.of(shape.slot)
        needed = model.get_constant_fqns()
        problem = layout_problem(self._layouts[name], live, needed)
        if problem is not None:
            return problem
        target = tuple((fqn, live[fqn].data_ptr(), tuple(live[fqn].stride())) for fqn in needed)
        if self._bound_to.get(name) != target:  # each binding leaks its handles (above): only when needed
            bind_by_reference(model, live, needed)
            self._bound_to[name] = target
            setattr(self.unet, WEIGHTS_BOUND_ATTR, True)
        return None

    def refuse(self, name: str, why: str) -> None:
        """Stop using (and wanting) the compiled forward `name`."""
        self.refused[name] = why
        self.wanted.pop(name, None)
        self.loaded.pop(name, None)
        self.shapes.pop(name, None)
        self.unbound.discard(name)
        self.checked.discard(name)
        _tell(f"compiled UNet forward {name} not used: {why}")

    # --- the compiling process ---------------------------------------------------------------------------------
    @property
    def compiling(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def compile_wanted(self) -> bool:
        """Start the compiling process for the wanted shapes that have no package yet, unless it is running.
        Returns whether one was started. Shapes a finished process left without a package or a `.failed` (it
        crashed, or ran out of GPU memory beside a training) are not asked for again until the worker restarts.
        Not while a training holds the UNet in another memory layout than this folder's (a card that trains in the
        default layout, trainer/training/lora_scope.py): the packages would be compiled for that layout, never bind
        to the served one, and never be compiled again. The next idle moment after the training starts it."""
        if self.compiling or channels_last(self.unet) != self.channels_last:
            return False
        if self._process is not None:
            code, self._process = self._process.returncode, None
            for name in self._asked:
                finished = (self.dir / f"{name}.json").exists() or (self.dir / f"{name}.failed").exists()
                if not finished and name not in self.refused:  # (a .failed is refused with its own reason)
                    self.refuse(name, f"the compiling process ended ({code}) without it; see "
                                      f"{self.dir / 'compile.log'}")
        pending = [shape for name, shape in self.wanted.items()
                   if not (self.dir / f"{name}.json").exists() and not (self.dir / f"{name}.failed").exists()]
        if not pending:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        facts = self.facts
        spec = {"config": facts["config"], "dtype": facts["dtype"], "channels_last": facts["channels_last"],
                "device": str(self.unet.conv_in.weight.device), "out_dir": str(self.dir),
                "shapes": [shape.to_json() for shape in pending], "parent": os.getpid()}
        # One per worker (GPUs sharing the data directory each compile their own), written whole; not *.json: that
        # names a finished package.
        spec_path = self.dir / f"compile-{os.getpid()}.spec"
        partial = spec_path.with_name(f".{spec_path.name}")
        partial.write_text(json.dumps(spec))
        os.replace(partial, spec_path)
        self._asked = [shape.name for shape in pending]
        with open(self.dir / "compile.log", "ab") as log_file:
            self._process = subprocess.Popen([self.python, "-m", "trainer.generation.aot_compile", str(spec_path)],
                                             stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                             cwd=_package_root())
        self.compiles_started += 1
        _tell(f"compiling the UNet forward for {len(pending)} shape(s) in process {self._process.pid} "
              f"(log: {self.dir / 'compile.log'})")
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Until the compiling process ends (tests, benches)."""
        if self._process is not None:
            self._process.wait(timeout)

    def close(self) -> None:
        if self.compiling:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()


class LiveConstants:
    """The live UNet's tensors as compiled forwards name them (`live_constants`), worked out once per slot layout,
    and the slot it holds now."""

    def __init__(self, unet):
        self.unet = unet
        self.slot = live_slot_layout(unet)
        self._by_slot: dict[SlotLayout | None, dict[str, torch.Tensor]] = {}

    def of(self, slot: SlotLayout | None) -> dict[str, torch.Tensor]:
        if slot not in self._by_slot:
            self._by_slot[slot] = live_constants(self.unet, slot)
        return self._by_slot[slot]

    def slot_problem(self, shape: ForwardShape) -> str | None:
        """Why a forward compiled with generation's slot cannot run on the UNet now (None: it can, or it has none)."""
        if shape.slot is None or shape.slot == self.slot:
            return None
        if self.slot is None:
            return "the UNet holds no mixed-LoRA slot"
        return f"the UNet's mixed-LoRA slot is another (rank {self.slot.rank}, {len(self.slot.targets)} layers)"


def _tell(line: str) -> None:
    """A line for the bot's log (the worker's stderr), as the worker's own notices are written."""
    print(f"worker: {line}", file=sys.stderr, flush=True)


def _package_root() -> str:
    """The directory `trainer` is imported from, so `python -m trainer.generation.aot_compile` finds the same code."""
    return str(Path(__file__).resolve().parents[2])
