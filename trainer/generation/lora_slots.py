"""Concept LoRAs applied to the resident pipeline two ways: folded into the base weights, or through one slot.

Folded (`folded`): when every row of a forward uses the same LoRAs (a single request, the text encoder always), their
product B·A is added to the base weights in place and no adapter is active, so a step costs what the bare model
costs (docs/BENCHMARKS.md: 10.3 vs 15 ms per CFG step with the slot and its mask). A copy of each touched weight,
taken on entry, is copied back on exit however the block ends: the base weights come back bit-exact. The copies'
memory (~190 MB for SD 1.5 in bf16) is kept for the next request until `release()`.

Slot (`active`, mixed batches): ONE fixed peft adapter per model whose weights are overwritten in place.
Why: CUDA graphs (trainer/generation/fast_unet.py) bake in the kernels and tensor addresses of the UNet forward. With one
adapter of fixed rank R that never moves, switching members' LoRAs is a few `_foreach_copy_` calls into the slot's
A/B weights (no peft bookkeeping, no new modules, captured graphs stay valid), and unused ranks are zero.

Layout: the LoRAs one forward needs are laid side by side along the rank axis: LoRA k owns ranks
[offset_k, offset_k + r_k): A_slot[offset_k:…] = A_k and B_slot[:, offset_k:…] = weight_k · scaling_k · B_k, the
slot's own scaling is 1. Several concepts in one prompt simply sit next to each other (peft sums active adapters the
same way). Mixed-LoRA batching: a forward hook on every slot lora_A multiplies its output by a per-sample mask of
shape [batch, 1, R] (1 on the ranks of that sample's LoRAs), so each row of the batch only sees its own LoRAs.

LoRA files are read with diffusers' own loader (`load_lora_weights` into a temporary adapter: every file format and
alpha convention diffusers knows: kohya's `lora_te1_`/`lora_te2_` for SDXL's two text encoders too), copied out
of the peft layers into a small LRU cache on the device, and the
temporary adapter is deleted again. The slot is active only inside `active()` and weights are folded only inside
`folded()`; outside them no adapter of ours is active, the base weights are the model's own and nothing of ours
requires grad, so the training engine sharing the pipeline never sees either.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.contract.errors import UserError
from trainer.generation.aot_shapes import SlotLayout, dtype_name
from trainer.generation.pnginfo import lora_hash
from trainer.models.family import TEXT_ENCODER_TARGETS, UNET_TARGETS

log = logging.getLogger(__name__)

SLOT_NAME = "gen_slot"
LOADING_NAME = "gen_loading"
# Every model a LoRA file may touch; SD 1.x pipelines have no text_encoder_2 and it is skipped there.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The modules training targets (trainer/models/family.py: one list for both): the slot always covers them.
DEFAULT_TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS, "text_encoder_2": TEXT_ENCODER_TARGETS}


@dataclass(frozen=True)
class LayerStack:
    """The LoRA factors of every layer (of one component) whose factors have the same shapes, stacked so that all
    their B·A products are one batched matmul. Convolution factors are flattened to matrices."""
    names: tuple[str, ...]
    down: torch.Tensor  # [layers, r, in·kh·kw]  (A)
    up: torch.Tensor    # [layers, out, r]       (B·scaling)


@dataclass
class CachedLora:
    """One LoRA file's weights, per component and layer: (A [r, in…], B·scaling [out, r…]) on the device.

    The per-layer tensors are views into `stacks` (the same memory), which `LoraSlots.folded` multiplies in batches."""
    path: Path
    short_hash: str  # A1111's LoRA hash (12 hex), also written into the PNG parameters
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    stacks: dict[str, list[LayerStack]]

    @property
    def name(self) -> str:
        return f"gen_{self.short_hash}"

    @property
    def rank(self) -> int:
        return max((a.shape[0] for layers in self.layers.values() for a, _ in layers.values()), default=0)


@dataclass(frozen=True)
class Placement:
    """Which LoRAs (with their weights) row `row` of the batch uses: filled by `LoraSlots.place`."""
    loras: tuple[tuple[CachedLora, float], ...]


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _stacked(found: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Group layers by the shapes of their (A, B) and stack each group; per-layer views into the stacks."""
    by_shape: dict[tuple, list[str]] = {}
    for name, (a, b) in found.items():
        by_shape.setdefault((tuple(a.shape), tuple(b.shape)), []).append(name)
    layers, stacks = {}, []
    for (a_shape, b_shape), names in by_shape.items():
        down = torch.stack([found[n][0].reshape(a_shape[0], -1) for n in names])
        up = torch.stack([found[n][1].reshape(b_shape[0], -1) for n in names])
        stacks.append(LayerStack(tuple(names), down, up))
        layers.update({n: (down[i].view(a_shape), up[i].view(b_shape)) for i, n in enumerate(names)})
    return layers, stacks


def _base_weight(model, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


# Largest B·A product computed at once while folding (elements): bounds the temporary memory (64 MB in bf16).
FOLD_CHUNK_ELEMENTS = 1 << 25


def _tuner_layers(model) -> dict[str, object]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def add_slot(model, names: list[str], rank: int, mask_of) -> tuple[dict[str, object], list]:
    """Add the slot adapter (SLOT_NAME, `rank`, scaling 1) to `model`'s modules `names`, inactive, its weights as
    peft initialises them (random), with a hook on every lora_A multiplying its output by the mask `mask_of()`
    returns (None: left as it is). Returns ({module name: peft layer}, [the hooks' handles]). Shared by the service
    and the process compiling the slotted UNet ahead of time (trainer/generation/aot_compile.py)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=names),
                      adapter_name=SLOT_NAME)
    layers = _slot_layers(model)
    hooks = []
    for layer in layers.values():
        layer.set_adapter([], inference_mode=True)
        hooks.append(layer.lora_A[SLOT_NAME].register_forward_hook(_mask_hook(mask_of)))
    for pname, param in model.named_parameters():
        if f".{SLOT_NAME}." in pname:
            param.requires_grad_(False)
    return layers, hooks


def _mask_hook(mask_of):
    def hook(module, args, output):
        mask = mask_of()
        if mask is None:
            return output
        if output.shape[0] != mask.shape[0]:
            raise RuntimeError(f"LoRA mask for batch {mask.shape[0]} used on a batch of {output.shape[0]}")
        if output.dim() == 4:  # a Conv2d LoRA: ranks are channels
            return output * mask[:, 0, :, None, None]
        return output * mask.view(mask.shape[0], *([1] * (output.dim() - 2)), mask.shape[-1])
    return hook


def slot_layout(layers: dict[str, object]) -> SlotLayout | None:
    """The layout of the slot held by these peft layers ({module name: layer}, as `add_slot` returns), or None."""
    if not layers:
        return None
    weight = next(iter(layers.values())).lora_A[SLOT_NAME].weight
    return SlotLayout(weight.shape[0], tuple(sorted(layers)), dtype_name(weight.dtype))


def _slot_layers(model) -> dict[str, object]:
    """{module name: peft layer} of every layer of `model` holding the slot."""
    return {name: layer for name, layer in _tuner_layers(model).items() if SLOT_NAME in getattr(layer, "lora_A", {})}


def live_slot_layout(model) -> SlotLayout | None:
    """The layout of the slot `model` holds now (walks its modules: not for every step)."""
    return slot_layout(_slot_layers(model))


class LoraSlots:
    def __init__(self, pipe, rank: int = 128, capacity: int = 8):
        if capacity < 1 or rank < 1:
            raise ValueError("capacity and rank must be at least 1")
        self.pipe = pipe
        self.rank = rank
        self.capacity = capacity
        self.loads = 0            # LoRA files actually read (tests, logs)
        self.version = 0          # bumped whenever the slot's modules are rebuilt (captured graphs must go)
        self._cache: OrderedDict[tuple, CachedLora] = OrderedDict()
        self._layers: dict[str, dict[str, object]] = {}   # component -> module name -> peft layer with our slot
        self._masks: dict[tuple[str, int], torch.Tensor] = {}  # (component, batch) -> [batch, 1, R] mask
        self._layouts: dict[str, tuple[int, SlotLayout | None]] = {}  # component -> (version, its slot's layout)
        self._usual: dict[str, tuple[object, set[str]]] = {}  # component -> (its model, its usual target layers)
        self._mask: dict[str, torch.Tensor | None] = {c: None for c in COMPONENTS}
        self._hooks = []
        self._used = {c: 0 for c in COMPONENTS}  # ranks [0, used) may hold stale weights; the rest are zero
        self._every_layer: dict[str, tuple] = {}
        self._backups: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (model, layer) -> (W, copy)
        self._folded: set[str] = set()
        self.runs: Counter[str] = Counter()  # "unet folded", "unet slot", "text_encoder folded": which path ran

    # --- the cache of LoRA files -----------------------------------------------------------------------------
    def get(self, path: str | Path, label: str) -> CachedLora:
        """The LoRA file at `path`, read once and then cached. `label` (the token) names it in errors."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"The LoRA file for {label} is missing; its owner may need to train it again.")
        key = _file_key(path)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry
        entry = CachedLora(path, lora_hash(path), *self._read(path, label))
        self._cache[key] = entry
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return entry

    def _read(self, path: Path, label: str) -> tuple[dict, dict]:
        pipe = self.pipe
        try:
            pipe.load_lora_weights(str(path), adapter_name=LOADING_NAME)
        except Exception as e:
            self._drop_loading_adapter()
            log.exception("loading LoRA %s for %s failed", path, label)
            raise UserError(f"The LoRA file for {label} could not be loaded ({type(e).__name__}); "
                            "its owner may need to train it again.") from e
        try:
            layers, stacks = {}, {}
            for component in COMPONENTS:
                model = getattr(pipe, component, None)
                if model is None:
                    continue
                found = {}
                for name, layer in _tuner_layers(model).items():
                    if LOADING_NAME in getattr(layer, "lora_A", {}):
                        a = layer.lora_A[LOADING_NAME].weight.detach()
                        b = layer.lora_B[LOADING_NAME].weight.detach() * layer.scaling[LOADING_NAME]
                        found[name] = (a.clone(), b.to(a.dtype).clone())
                if found:
                    layers[component], stacks[component] = _stacked(found)
        finally:
            self._drop_loading_adapter()
        self.loads += 1
        return layers, stacks

    def _drop_loading_adapter(self) -> None:
        present = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if LOADING_NAME in present:
            self.pipe.delete_adapters([LOADING_NAME])
        for layers in self._layers.values():  # peft may have made another adapter active: leave ours off
            for layer in layers.values():
                layer.set_adapter([], inference_mode=True)

    def clear(self) -> None:
        """Forget every cached LoRA, remove the slot adapters from the pipeline and free the weight copies."""
        self._cache.clear()
        self._remove_slot()
        self.release()

    def release(self) -> None:
        """Free the copies of base weights kept for folding (made again, once, by the next folded request)."""
        if self._folded:
            raise RuntimeError(f"cannot release weight copies while {sorted(self._folded)} is folded")
        self._backups.clear()

    # --- folding: one group of LoRAs for every row --------------------------------------------------------------
    @contextmanager
    def folded(self, component: str, group: tuple):
        """Inside: `component`'s base weights carry the LoRAs of `group` ((CachedLora, weight), ...) added in, and no
        adapter is active on it. On exit, however the block ends, every touched weight is restored bit-exact."""
        if component in self._folded:
            raise RuntimeError(f"{component} is already folded")
        self.deactivate((component,))
        parts = [(stack, float(weight)) for lora, weight in group if float(weight) != 0.0
                 for stack in lora.stacks.get(component, ())]
        model = getattr(self.pipe, component, None)
        if not parts or model is None:
            self.runs[f"{component} folded"] += 1
            yield self
            return
        names = list(dict.fromkeys(name for stack, _ in parts for name in stack.names))
        pairs = self._backup_pairs(model, names)
        weights = {name: weight for name, (weight, _) in zip(names, pairs)}
        originals, copies = [w for w, _ in pairs], [c for _, c in pairs]
        with torch.no_grad():
            torch._foreach_copy_(copies, originals)
        self._folded.add(component)
        try:
            with torch.no_grad():
                for stack, weight in parts:
                    self._add_products(stack, weight, [weights[n] for n in stack.names])
            self.runs[f"{component} folded"] += 1
            yield self
        finally:
            with torch.no_grad():
                torch._foreach_copy_(originals, copies)
            self._folded.discard(component)

    def _backup_pairs(self, model, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(base weight, its copy) per layer; a copy is allocated once and reused while the weight's layout holds."""
        pairs = []
        for name in names:
            key = (id(model), name)
            weight = _base_weight(model, name)
            pair = self._backups.get(key)
            if pair is None or pair[0] is not weight or not _same_layout(*pair):
                pair = self._backups[key] = (weight, torch.empty_like(weight))
            pairs.append(pair)
        return pairs

    @staticmethod
    def _add_products(stack: LayerStack, weight: float, targets: list[torch.Tensor]) -> None:
        """targets[i] += weight · up[i] @ down[i] (viewed as the weight's shape), a chunk of layers per matmul."""
        _, out, _ = stack.up.shape
        per_layer = out * stack.down.shape[-1]
        step = max(1, FOLD_CHUNK_ELEMENTS // per_layer)
        for start in range(0, len(targets), step):
            chunk = targets[start:start + step]
            products = torch.bmm(stack.up[start:start + step], stack.down[start:start + step])
            if products.dtype != chunk[0].dtype:
                products = products.to(chunk[0].dtype)
            torch._foreach_add_(chunk, [p.view(t.shape) for p, t in zip(products, chunk)], alpha=weight)

    # --- the slot ----------------------------------------------------------------------------------------------
    def _ensure_slot(self, needs: dict[str, set[str]], rank: int) -> None:
        """Make sure each component's slot covers the layers in `needs` at `rank` or more (rebuilding it if not)."""
        missing = any(not names <= set(self._layers.get(c, {})) for c, names in needs.items() if names)
        if self._slot_intact() and not missing and rank <= self.rank:
            return
        targets = {c: set(self._layers.get(c, {})) | names for c, names in needs.items()}
        self.rank = max(self.rank, 1 << (max(rank, 1) - 1).bit_length())
        self._remove_slot()
        self._install(targets)

    def _slot_intact(self) -> bool:
        """Our slot modules are still in the models (nobody deleted the adapter or replaced it with another slot)."""
        if not self._layers:
            return False
        for layers in self._layers.values():
            layer = next(iter(layers.values()))
            module = layer.lora_A[SLOT_NAME] if SLOT_NAME in layer.lora_A else None
            if getattr(module, "_boothbot_slot_owner", None) != id(self):
                return False
        return True

    def _all_layers(self, component: str) -> list:
        """Every peft layer of `component` (ours and foreign adapters'), cached until its adapter set changes."""
        model = getattr(self.pipe, component, None)
        config = getattr(model, "peft_config", None) or {}
        key = (id(model), tuple(config))
        cached = self._every_layer.get(component)
        if cached is None or cached[0] != key:
            cached = self._every_layer[component] = (key, list(_tuner_layers(model).values()) if config else [])
        return cached[1]

    def _install(self, targets: dict[str, set[str]]) -> None:
        for component in targets:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            names = sorted(self._usual_targets(component) | set(targets.get(component) or ()))
            if not names:
                continue
            layers, hooks = add_slot(model, names, self.rank, lambda component=component: self._mask[component])
            for layer in layers.values():
                layer.lora_A[SLOT_NAME]._boothbot_slot_owner = id(self)
                layer.lora_A[SLOT_NAME].weight.data.zero_()
                layer.lora_B[SLOT_NAME].weight.data.zero_()
            self._hooks.extend(hooks)
            self._layers[component] = layers
            self._used[component] = 0
        self._masks.clear()
        self.version += 1

    def _usual_targets(self, component: str) -> set[str]:
        """`component`'s usual attention projections (the layers training targets), which the slot always covers so
        that later LoRAs rarely force a rebuild."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = getattr(self.pipe, component, None)
        cached = self._usual.get(component)
        if cached is None or cached[0] is not model:
            names = set() if model is None else {
                n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, BaseTunerLayer))
                and any(n.endswith("." + t) for t in DEFAULT_TARGETS[component]) and ".lora_" not in n}
            cached = self._usual[component] = (model, names)
        return cached[1]

    def planned_layout(self) -> SlotLayout | None:
        """The UNet slot's layout; before the first mixed batch makes the slot, the layout that batch will make for
        LoRAs like the bot trains (the usual layers, ranks that fit), so that its forward can be compiled ahead of
        time before any member waits for it."""
        layout = self.layout("unet")
        names = self._usual_targets("unet")
        if layout is not None or not names:
            return layout
        weight = _base_weight(self.pipe.unet, min(names))
        return SlotLayout(self.rank, tuple(sorted(names)), dtype_name(weight.dtype))

    def _remove_slot(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        present = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if SLOT_NAME in present:
            self.pipe.delete_adapters([SLOT_NAME])
        for component in COMPONENTS:
            model = getattr(self.pipe, component, None)
            for layer in (_tuner_layers(model).values() if model is not None else ()):
                if not layer.active_adapters or SLOT_NAME in layer.active_adapters:
                    layer.set_adapter([], inference_mode=True)
        self._layers.clear()
        self._masks.clear()
        self.version += 1

    def place(self, component: str, groups: list[tuple[tuple[CachedLora, float], ...]]) -> list[list[int]]:
        """Write the LoRAs of every group side by side into `component`'s slot; return each group's rank indexes.

        A LoRA used by several groups with the same weight is written once and shared.
        """
        layers = self._layers.get(component, {})
        offsets: dict[tuple[int, float], int] = {}
        ranks_of_group: list[list[int]] = []
        writes: list[tuple[CachedLora, float, int]] = []
        top = 0
        for group in groups:
            indexes = []
            for lora, weight in group:
                parts = lora.layers.get(component)
                if not parts:
                    continue
                r = max(a.shape[0] for a, _ in parts.values())
                key = (id(lora), float(weight))
                if key not in offsets:
                    offsets[key] = top
                    writes.append((lora, float(weight), top))
                    top += r
                indexes.extend(range(offsets[key], offsets[key] + r))
            ranks_of_group.append(indexes)
        if top > self.rank:
            raise ValueError(f"{top} LoRA ranks do not fit a slot of rank {self.rank}")
        if not layers:
            return ranks_of_group
        stale = max(self._used[component], top)
        zero = []
        for layer in layers.values():
            zero.append(layer.lora_A[SLOT_NAME].weight[:stale])
            zero.append(layer.lora_B[SLOT_NAME].weight[:, :stale])
        if zero:
            torch._foreach_zero_(zero)
        dst, src = [], []
        for lora, weight, offset in writes:
            for name, (a, b) in lora.layers[component].items():
                layer = layers[name]
                r = a.shape[0]
                dst.append(layer.lora_A[SLOT_NAME].weight[offset:offset + r])
                src.append(a)
                dst.append(layer.lora_B[SLOT_NAME].weight[:, offset:offset + r])
                src.append(b)
        if dst:
            torch._foreach_copy_(dst, src)
        for lora, weight, offset in writes:
            if weight != 1.0:
                views = [layers[name].lora_B[SLOT_NAME].weight[:, offset:offset + a.shape[0]]
                         for name, (a, _) in lora.layers[component].items()]
                torch._foreach_mul_(views, weight)
        self._used[component] = top
        return ranks_of_group

    def mask(self, component: str, rows: list[list[int]]) -> torch.Tensor:
        """The [batch, 1, R] mask buffer for `component` at this batch size (the same tensor every time), filled."""
        buffer = self._mask_buffer(component, len(rows))
        host = torch.zeros(len(rows), 1, self.rank, dtype=buffer.dtype)
        for i, indexes in enumerate(rows):
            host[i, 0, indexes] = 1
        buffer.copy_(host, non_blocking=False)
        return buffer

    def _mask_buffer(self, component: str, batch: int) -> torch.Tensor:
        """The mask tensor of `component` for batches of `batch` rows: one per size, kept, so that CUDA graphs (which
        read it where it is) see every later filling."""
        weight = next(iter(self._layers[component].values())).lora_A[SLOT_NAME].weight
        key = (component, batch)
        buffer = self._masks.get(key)
        if buffer is None or buffer.shape[-1] != self.rank:
            buffer = self._masks[key] = torch.zeros(batch, 1, self.rank, dtype=weight.dtype, device=weight.device)
        return buffer

    def layout(self, component: str = "unet") -> SlotLayout | None:
        """What a compiled forward of `component` with this slot bakes in (trainer/generation/aot_shapes.py)."""
        cached = self._layouts.get(component)
        if cached is None or cached[0] != self.version:
            cached = self._layouts[component] = (self.version, slot_layout(self._layers.get(component, {})))
        return cached[1]

    def unet_in_use(self) -> tuple[SlotLayout, torch.Tensor] | None:
        """(layout, mask) while the UNet's slot is what its forward runs (in `active`, mixed rows), else None."""
        mask = self._mask["unet"]
        if mask is None or not self.unet_active():
            return None
        return self.layout("unet"), mask

    @contextmanager
    def exercised(self, layout: SlotLayout, rows: int, mask: torch.Tensor):
        """For checking a compiled forward of the slotted UNet against the eager one (the worker's idle moments):
        inside, when the UNet's slot has `layout`, it holds fixed random LoRA weights and `mask` (copied into the
        slot's own [rows, 1, R] buffer, the one members' batches use) and is active; yields whether it does. On
        exit the slot is zero and off again."""
        if self.layout("unet") != layout or self._folded:
            yield False
            return
        layers = self._layers["unet"]
        generator = torch.Generator(device=mask.device).manual_seed(2)
        try:
            self.deactivate()
            with torch.no_grad():  # scaled so that the LoRAs change each layer's output by ~10 %
                for layer in layers.values():
                    down, up = layer.lora_A[SLOT_NAME].weight, layer.lora_B[SLOT_NAME].weight
                    down.copy_(torch.randn(down.shape, generator=generator, device=down.device)
                               / down[0].numel() ** 0.5)
                    up.copy_(torch.randn(up.shape, generator=generator, device=up.device) * 0.1 / up.shape[1] ** 0.5)
            self._used["unet"] = self.rank
            self._mask["unet"] = self._mask_buffer("unet", rows).copy_(mask)
            for layer in layers.values():
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter([SLOT_NAME], inference_mode=True)
            yield True
        finally:
            self.deactivate()
            with torch.no_grad():
                torch._foreach_zero_([w for layer in layers.values()
                                      for w in (layer.lora_A[SLOT_NAME].weight, layer.lora_B[SLOT_NAME].weight)])
            self._used["unet"] = 0

    def needs(self, loras) -> dict[str, set[str]]:
        """The layers, per component, that these LoRAs touch."""
        names = {c: set() for c in COMPONENTS}
        for lora in loras:
            for component, layers in lora.layers.items():
                names.setdefault(component, set()).update(layers)
        return names

    @contextmanager
    def active(self, *, unet_groups: list[tuple], unet_rows: list[int]):
        """Mixed batches. Inside: the UNet slot holds the LoRAs of `unet_groups` side by side (each group a tuple of
        (CachedLora, weight)) and row i of the UNet batch sees only the ranks of group unet_rows[i]; with no LoRA
        weights to hold the slot stays off. On exit no adapter is active."""
        distinct = {id(l): l for group in unet_groups for l, _ in group if "unet" in l.layers}
        if distinct:
            self._ensure_slot({"unet": self.needs(distinct.values())["unet"]}, self._rank_used(unet_groups))
        try:
            self.deactivate()  # also any foreign adapter (the training engine's) someone left active
            if distinct and "unet" in self._layers:
                ranks = self.place("unet", unet_groups)
                self._mask["unet"] = self.mask("unet", [ranks[g] for g in unet_rows])
                for layer in self._layers["unet"].values():
                    if layer.disable_adapters:  # undo a disable_lora() someone may have left behind
                        layer.enable_adapters(True)
                    layer.set_adapter([SLOT_NAME], inference_mode=True)
            self.runs["unet slot"] += 1
            yield self
        finally:
            self.deactivate()

    @staticmethod
    def _rank_used(groups) -> int:
        distinct = {(id(l), float(w)): l for group in groups for l, w in group}
        return sum(l.rank for l in distinct.values())

    def fits(self, groups) -> bool:
        """Whether these groups of (CachedLora, weight) fit the slot side by side without growing it."""
        return self._rank_used(groups) <= self.rank

    def deactivate(self, components=COMPONENTS) -> None:
        """No adapter active on any layer (ours or foreign) of `components`, no mask."""
        for component in components:
            self._mask[component] = None
            for layer in self._all_layers(component):
                if layer.active_adapters:
                    layer.set_adapter([], inference_mode=True)

    def unet_active(self) -> bool:
        layers = self._layers.get("unet")
        return bool(layers) and SLOT_NAME in next(iter(layers.values())).active_adapters
