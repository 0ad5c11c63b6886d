"""UNet forward replayed from CUDA graphs at fixed shapes (CUDA only; elsewhere the UNet runs as it is).

At batch 1-2 a denoising step is bound by Python and kernel launches, not by the GPU (docs/BENCHMARKS.md: the GPU
is busy ~30 % of an eager step, and every peft LoRA layer adds Python). A graph captured once per
(batch, latent size, prompt length, LoRA slot on/off) replays the whole forward with one launch. Inputs are copied
into the graph's static buffers, the output is cloned out. Captured lazily, the `max_graphs` most recent kept (8:
generation's 2- and 16-row shapes, bare and with the mixed-LoRA slot, each a whole forward and the deep cache's head;
the graphs share one memory pool).

What a graph bakes in: tensor addresses and the kernels chosen at capture. The LoRA slot (trainer/generation/lora_slots.py)
keeps both fixed (weights and masks change in place), so switching LoRAs keeps graphs valid; when the slot is
rebuilt (`slots.version`), or anything else about the UNet's parameters moves, the graphs are dropped.

SDXL's UNet also takes `added_cond_kwargs` (the pooled text embedding `text_embeds` and the size numbers
`time_ids`): they get static buffers of their own, like the sample.

With `aot` (trainer/generation/aot_kernels.py), a graph is captured around the UNet forward compiled ahead of time for
its shape, where one exists and no adapter is active, or generation's mixed-LoRA slot alone (a forward compiled with
the slot, its mask an input); off CUDA (no graphs) the compiled forward is called directly. A package's graph is
captured in `adopt_compiled` (the worker's idle moments: first use, and again after the graphs were released for a
training) or in a member's request when its graph is missing, but never while a yielded training is held in the UNet
(`training_held()`): such a capture failed on the H200 (cuDNN: CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH, 2026-12-02),
costing that member ~2 s and the package for good. Then the request gets the eager forward's graph, and the next idle
moment captures the compiled one. A failed capture falls back the same way; a package is refused only after
MAX_CAPTURE_TRIES failed captures in a row. Warm-up and capture share one side stream (lazy per-stream state, such as
cuDNN's, is then set up before the capture, not in it).

With the deep cache (trainer/generation/deep_cache.py) a step is one of two parts, each with graphs of its own
(`whole`, `head`): the whole forward (eager, or the package compiled ahead of time) also returns its deep feature,
and the head's graph, eager kernels always, takes a kept feature as one more static input.

`installed()` points the UNet instance's `forward` at the graph runner for the duration of a request and restores it
on exit; calls the graphs can't serve (gradients on, other extra conditioning, CPU tensors) run eagerly. Whether the
parameters moved is checked once per request, on entry (walking SD 1.5's 686 parameters costs milliseconds: too
much for every step). LoRAs folded into the weights in place (trainer/generation/lora_slots.py) move nothing.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.generation.aot_shapes import ForwardShape, relative_error, too_far_off
from trainer.generation.deep_cache import HEAD, WHOLE, DeepCache, output, plain_step
from trainer.generation.lora_slots import _tuner_layers

log = logging.getLogger(__name__)

INDUCTOR_CACHE = Path("cache") / "inductor"  # under the bot's data directory


def keep_compiled_kernels(data_dir: Path) -> Path:
    """With `compile=True`: inductor's caches (FX graphs, Triton kernels, autotuning) under the bot's data directory
    rather than in /tmp, so a restarted worker (or one after a reboot) finds the kernels it compiled and does not
    spend a minute per image size again. An operator's own TORCHINDUCTOR_CACHE_DIR wins. Returns the directory."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(data_dir).resolve() / INDUCTOR_CACHE))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


MAX_CAPTURE_TRIES = 3  # failed captures in a row of a compiled forward's graph before the package is refused


class _Entry:
    def __init__(self, part: str, graph, static: tuple, outputs: tuple, shape: ForwardShape, ahead):
        self.part, self.graph, self.outputs = part, graph, outputs  # outputs: (noise, deep feature or none)
        # added: {name: static tensor} for SDXL's added conditioning, {} otherwise; feature: the head's input
        self.sample, self.timestep, self.hidden, self.added, self.feature = static
        # The package compiled ahead of time the graph replays (kept alive with it), or None: eager kernels.
        self.shape, self.ahead = shape, ahead


class UNetGraphs:
    def __init__(self, unet, *, state_key=lambda: None, max_graphs: int = 8, warmup: int = 2, compile: bool = False,
                 aot=None, training_held=lambda: False, slot=lambda: None, exercise_slot=None):
        self.unet = unet
        self.aot = aot  # AotKernels or None
        # Generation's mixed-LoRA slot: `slot()` is (SlotLayout, mask) while it alone is active, else None;
        # `exercise_slot(layout, rows, mask)` a context holding test LoRAs in it (LoraSlots.exercised), to check a
        # slotted compiled forward against the eager one.
        self.slot = slot
        self.exercise_slot = exercise_slot
        self.training_held = training_held  # a yielded training resident in the UNet: no compiled captures now
        # Optional: inductor's fused kernels inside the graphs (compiles once per shape on the first warm-up: slow).
        # Compiling only the repeated transformer blocks (diffusers' regional compile) was measured too: a seventh of
        # the compile time for a quarter of the speed-up (8 % per image), still seconds per new shape that a member
        # would wait for (docs/BENCHMARKS.md, `python -m bench.compile_modes`), so it is not offered.
        # Generation's deep features reused across steps (trainer/generation/deep_cache.py): a whole forward also
        # hands back its deep feature; the head's graphs run the eager kernels (a twelfth of the whole's arithmetic).
        self.deep = DeepCache(unet) if DeepCache.supported(unet) else None
        self._compiled = torch.compile(self._eager_whole, dynamic=False) if compile else None
        self.state_key = state_key  # anything else that changes the captured kernels (LoRA slot on, its version)
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.captures = 0
        self.replays = 0
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._pool = None
        self._stream = None  # the side stream every warm-up and capture runs on
        self._params_key = None  # every parameter's place (adapters' too)
        self._weights_key = None  # the UNet's own weights' place: what the graphs read
        self._tuner_layers: list = []
        self._adopting = False  # in adopt_compiled: the GPU is idle
        self._capture_failures: dict[str, int] = {}  # compiled forward's name -> failed captures since a success

    @staticmethod
    def usable(unet) -> bool:
        return unet.device.type == "cuda"

    @contextmanager
    def installed(self):
        self._check_params()
        unet = self.unet
        had_own = "forward" in vars(unet)
        previous = vars(unet).get("forward")
        unet.forward = self._forward
        try:
            yield self
        finally:
            if had_own:
                unet.forward = previous
            else:
                del unet.forward

    @property
    def kept(self) -> int:
        """How many graphs are captured and kept now."""
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    def _plain(self, sample, timestep, hidden, added=None):
        return type(self.unet).forward(self.unet, sample, timestep, hidden, added_cond_kwargs=added or None,
                                       return_dict=False)[0]

    def _eager_whole(self, sample, timestep, hidden, added=None) -> tuple:
        """The UNet's forward as (noise, deep feature), or (noise,) for a UNet the deep cache does not fit."""
        if self.deep is None:
            return (self._plain(sample, timestep, hidden, added),)
        return self.deep.whole(sample, timestep, hidden, added)

    def _eager_part(self, part: str, sample, timestep, hidden, added, feature=None) -> tuple:
        if part == HEAD:
            return (self.deep.head(sample, timestep, hidden, added, feature),)
        return self._eager_whole(sample, timestep, hidden, added)

    def _eager(self, *args, **kwargs):
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def _forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict: bool = True, **kwargs):
        added = dict(added_cond_kwargs or {})
        if not plain_step(sample, timestep, timestep_cond, cross_attention_kwargs, added, kwargs):
            return self._eager(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                               cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                               return_dict=return_dict, **kwargs)
        return output(self._run(WHOLE, sample, timestep, encoder_hidden_states, added, outputs=1)[0], return_dict)

    # The two parts of a step with the deep cache (trainer/generation/deep_cache.py `reusing`); plain steps only.
    def whole(self, sample, timestep, hidden, added: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(WHOLE, sample, timestep, hidden, added)

    def head(self, sample, timestep, hidden, added: dict, feature: torch.Tensor) -> torch.Tensor:
        return self._run(HEAD, sample, timestep, hidden, added, feature, outputs=1)[0]

    def _run(self, part: str, sample, timestep, hidden, added: dict, feature=None, outputs: int = 2) -> tuple:
        """One plain step's `part`: from a graph on CUDA (captured now if missing), else the compiled forward where
        there is one, else the eager kernels. Returns the first `outputs` outputs, copied out of the graph."""
        if not sample.is_cuda:  # no graphs: the forward compiled ahead of time alone, where there is one
            compiled = self._compiled_ahead(sample, timestep, hidden, added) if part == WHOLE else None
            if compiled is not None:
                return self._run_ahead(compiled, sample, timestep, hidden, added)
            return self._eager_part(part, sample, timestep, hidden, added, feature)
        key = self._key(part, sample, timestep, hidden, added)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, part, sample, timestep, hidden, added, feature)
        else:
            self._graphs.move_to_end(key)
        entry.sample.copy_(sample)
        entry.timestep.copy_(timestep.reshape(()))
        entry.hidden.copy_(hidden)
        for name, value in added.items():
            entry.added[name].copy_(value)
        if feature is not None:
            entry.feature.copy_(feature)
        entry.graph.replay()
        self.replays += 1
        return tuple(out.clone() for out in entry.outputs[:outputs])

    def _key(self, part: str, sample, timestep, hidden, added: dict) -> tuple:
        return (part, tuple(sample.shape), sample.dtype, tuple(hidden.shape), hidden.dtype, timestep.dtype,
                tuple((name, tuple(v.shape), v.dtype) for name, v in sorted(added.items())), self.state_key())

    def _adapter_active(self) -> bool:
        return any(layer.active_adapters and not layer.disable_adapters for layer in self._tuner_layers)

    def _compiled_ahead(self, sample, timestep, hidden, added: dict):
        """The forward compiled ahead of time for these inputs (None: there is none yet, or an adapter other than
        generation's slot alone is active: no compiled forward has it)."""
        if self.aot is None:
            return None
        shape = self._shape_of(sample, timestep, hidden, added)
        return None if shape is None else self.aot.get(shape, unchecked=self._adopting)

    def _shape_of(self, sample, timestep, hidden, added: dict) -> ForwardShape | None:
        """The compiled forward's shape for these inputs with the adapters active now: bare, with the slot, or None
        (another adapter is active)."""
        if not self._adapter_active():
            return ForwardShape.of(sample, timestep, hidden, added)
        in_use = self.slot()
        return None if in_use is None else ForwardShape.of(sample, timestep, hidden, added, in_use[0])

    def _run_ahead(self, compiled, sample, timestep, hidden, added: dict) -> tuple:
        """Run a package `_compiled_ahead` chose: with the slot's mask while the slot is what runs (a slotted one).
        Its outputs as `_eager_whole`'s."""
        in_use = self.slot()
        out = self.aot.run(compiled, sample, timestep, hidden, added, None if in_use is None else in_use[1])
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def adopt_compiled(self) -> int:
        """Load the forwards compiled ahead of time since the last call (the worker calls this when idle), capture
        their graphs now and check each against the eager forward, so that no member pays for either and none gets
        a wrong image from a package; graphs of the same shapes around the eager forward are dropped. Packages in
        use whose graphs were released since (a training needed the memory) are captured and checked again. Returns
        how many were adopted for the first time."""
        if self.aot is None:
            return 0
        self._check_params()
        if self._adapter_active():
            return 0  # the check below needs the bare UNet (or the slot alone); the next idle moment adopts
        new = self.aot.adopt()
        first_time = {shape.name for shape in new}
        shapes = new + self._to_check(exclude=first_time)
        names = {shape.name for shape in shapes}
        self._drop_graphs(lambda entry: entry.part == WHOLE and entry.shape.name in names and entry.ahead is None)
        adopted = 0
        self._adopting = True
        try:
            with torch.no_grad():
                for shape in shapes:
                    with self._exercised(shape) as ready:
                        error = self._compiled_error(shape) if ready else None
                    if error is None:
                        continue  # its graph could not be captured (or its slot is not held): the next idle moment
                    problem = too_far_off(error)
                    if problem is None:
                        if shape.name not in self.aot.checked:
                            self.aot.in_use(shape)
                            adopted += shape.name in first_time
                        continue
                    self.aot.refuse(shape.name, problem)
                    self._drop_graphs(lambda entry: entry.part == WHOLE and entry.shape.name == shape.name)
        finally:
            self._adopting = False
        return adopted

    @contextmanager
    def _exercised(self, shape: ForwardShape):
        """Around checking `shape`: for a slotted forward, the slot active with test LoRAs (yields False when the
        UNet does not hold that slot, or nothing can exercise it)."""
        if shape.slot is None:
            yield True
        elif self.exercise_slot is None:
            yield False
        else:
            with self.exercise_slot(shape.slot, shape.sample[0], shape.random_mask(self.unet.device)) as ready:
                yield ready

    def _to_check(self, exclude: set[str]) -> list[ForwardShape]:
        """Loaded packages (not `exclude`) to check and capture at this idle moment: those that fit the live weights
        but were never checked in this process (a slotted one bound only once the slot appeared), then on CUDA
        those in use whose graph is not captured now, as many as there is room for: a graph the most-recently-used
        limit pushed out is captured again by the request that needs it, not at every idle moment in turn."""
        serving = {name: shape for name, shape in self.aot.serving().items() if name not in exclude}
        unchecked = [shape for name, shape in serving.items() if name not in self.aot.checked]
        if not self.usable(self.unet):
            return unchecked
        graphed = {entry.shape.name for entry in self._graphs.values() if entry.ahead is not None}  # wholes only
        missing = [shape for name, shape in serving.items() if name in self.aot.checked and name not in graphed]
        return unchecked + missing[:max(0, self.max_graphs - len(self._graphs) - len(unchecked))]

    def _drop_graphs(self, which) -> None:
        for key in [key for key, entry in self._graphs.items() if which(entry)]:
            del self._graphs[key]

    def _compiled_error(self, shape: ForwardShape) -> float | None:
        """Relative difference between the compiled forward (replayed from its graph on CUDA, captured here) and
        the eager one on random inputs; None when the compiled one did not run (a graph capture refused it)."""
        inputs = shape.random_inputs(self.unet.device, channels_last=False)
        calls = self.aot.calls
        compiled = self._run(WHOLE, *inputs)
        if self.usable(self.unet):
            entry = self._graphs.get(self._key(WHOLE, *inputs))
            if entry is None or entry.ahead is None:
                return None
        elif self.aot.calls == calls:
            return None
        eager = self._eager_whole(*inputs)
        if len(compiled) != len(eager):
            return float("inf")
        return max(relative_error(out, reference) for out, reference in zip(compiled, eager))

    def _check_params(self) -> None:
        """Drop every graph when the UNet's own weights moved (re-laid out, re-cast, replaced). Adapters added or
        removed (a training's, generation's LoRA slot) leave the weights where the graphs read them: the graphs stay
        (what they compute is named by `state_key`), and only what is known about the layers is refreshed."""
        key = hash(tuple((p.data_ptr(), p.dtype) for p in self.unet.parameters()))
        if key == self._params_key:
            return
        self._params_key = key
        weights = own_weights_key(self.unet)
        if weights != self._weights_key:
            if self._graphs:
                log.info("UNet weights moved: dropping %d CUDA graph(s)", len(self._graphs))
            self.clear()
            self._weights_key = weights
        self._tuner_layers = list(_tuner_layers(self.unet).values())
        if self.aot is not None:
            self.aot.rebind()

    def _capture(self, key, part: str, sample, timestep, hidden, added, feature) -> _Entry:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        memory_format = torch.channels_last if self.unet.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last) and sample.dim() == 4 else torch.contiguous_format
        static_sample = torch.empty_like(sample, memory_format=memory_format).copy_(sample)
        static_t = timestep.detach().reshape(()).clone()
        static_hidden = hidden.detach().clone()
        static_added = {name: value.detach().clone() for name, value in added.items()}
        static_feature = None if feature is None else feature.detach().clone()
        static = (static_sample, static_t, static_hidden, static_added)
        shape = self._shape_of(*static) or ForwardShape.of(*static)
        if part == HEAD:  # always the eager kernels
            return self._capture_with(key, part, (*static, static_feature), shape, None)
        ahead = self._compiled_ahead(*static)  # also notes the shape for the compiling process
        if ahead is not None and (self._adopting or not self.training_held()):
            try:
                entry = self._capture_with(key, part, (*static, None), shape, ahead)
            except Exception as exc:  # noqa: BLE001 - a package that cannot be graphed costs speed, never a request
                self._capture_failed(shape.name, exc)
            else:
                self._capture_failures.pop(shape.name, None)  # refused only after failures in a row
                return entry
        return self._capture_with(key, part, (*static, None), shape, None)

    def _capture_failed(self, name: str, exc: Exception) -> None:
        tries = self._capture_failures[name] = self._capture_failures.get(name, 0) + 1
        reason = f"its CUDA graph could not be captured ({tries} tries): {str(exc).splitlines()[0][:300]}"
        if tries >= MAX_CAPTURE_TRIES:
            self.aot.refuse(name, reason)
        else:
            log.warning("compiled UNet forward %s: %s; the eager forward serves until the next try", name, reason)

    def _capture_with(self, key, part: str, static: tuple, shape: ForwardShape, ahead) -> _Entry:
        def run() -> tuple:
            if ahead is not None:
                return self._run_ahead(ahead, *static[:4])
            if self._compiled is not None and part == WHOLE:
                return self._compiled(*static[:4])
            return self._eager_part(part, *static)

        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup + (1 if self._compiled is not None and ahead is None else 0)):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None or not self._graphs:
            # A pool whose last graph is gone cannot be captured into again (the caching allocator asserts
            # use_count > 0, found on an H200): a new one; the old one's memory went with its graphs.
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            outputs = run()
        entry = _Entry(part, graph, static, outputs, shape, ahead)
        self._graphs[key] = entry
        self.captures += 1
        log.info("captured a UNet CUDA graph for %s%s%s (state %s; %d graph(s) kept, %d captures so far)", key[1:4],
                 " (the deep cache's head)" if part == HEAD else "",
                 " (compiled ahead of time)" if ahead is not None else "", key[-1], len(self._graphs), self.captures)
        return entry


def own_weights_key(unet) -> int:
    """Where the UNet's own weights are (pointers and dtypes; adapters' weights left out), which peft's wrapping of
    a layer does not change (the base weight stays the same tensor) and a new memory layout or dtype does."""
    return hash(tuple((p.data_ptr(), p.dtype) for name, p in unet.named_parameters() if ".lora_" not in name))
