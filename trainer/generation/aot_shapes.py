"""What identifies an ahead-of-time compiled UNet forward: the architecture it was built for and the shape it serves.

Shared by the worker's side (trainer/generation/aot_kernels.py) and the compiling process
(trainer/generation/aot_compile.py), so both name the same package the same way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

PREFIX = "unet."  # the compiled module holds the UNet as `unet`: its constants are named "unet.<parameter>"
# Set on a UNet whose weights compiled forwards read by reference: they must stay where they are (aot_kernels.py).
WEIGHTS_BOUND_ATTR = "_boothbot_weights_bound"
# How far (relative) a compiled forward may be from the eager one on random inputs: other kernels' rounding in fp16
# is ~1e-3; a package that computes something else is far off (a constant compiled in: 0.13,
# tests/trainer/test_aot_kernels.py).
COMPILED_TOLERANCE = 2e-2


@dataclass(frozen=True)
class SlotLayout:
    """Generation's mixed-LoRA slot (trainer/generation/lora_slots.py) as a compiled forward bakes it in: one peft
    adapter of `rank` on the UNet modules `targets` (sorted), its weights in `dtype`, each row's ranks chosen by a
    [batch, 1, rank] mask input of that dtype."""
    rank: int
    targets: tuple[str, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"rank": self.rank, "targets": list(self.targets), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> "SlotLayout":
        return cls(int(data["rank"]), tuple(data["targets"]), data["dtype"])


@dataclass(frozen=True)
class ForwardShape:
    """The tensors one UNet forward takes: the latents, the text embeddings, the timestep (0-dim) and SDXL's added
    conditioning ((name, shape, dtype), sorted by name). Dtypes as torch spells them without "torch.". With `slot`,
    the forward of the UNet with generation's mixed-LoRA slot active, which also takes the slot's mask."""
    sample: tuple[int, ...]
    hidden: tuple[int, ...]
    dtype: str
    hidden_dtype: str
    timestep_dtype: str
    added: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    slot: SlotLayout | None = None

    @classmethod
    def of(cls, sample, timestep, hidden, added: dict, slot: SlotLayout | None = None) -> "ForwardShape":
        return cls(tuple(sample.shape), tuple(hidden.shape), dtype_name(sample.dtype), dtype_name(hidden.dtype),
                   dtype_name(timestep.dtype),
                   tuple((name, tuple(added[name].shape), dtype_name(added[name].dtype)) for name in sorted(added)),
                   slot)

    def with_batch(self, rows: int) -> "ForwardShape":
        """The same forward for `rows` rows (every batched input's first dimension)."""
        return ForwardShape((rows, *self.sample[1:]), (rows, *self.hidden[1:]), self.dtype, self.hidden_dtype,
                            self.timestep_dtype,
                            tuple((name, (rows, *shape[1:]), dtype) for name, shape, dtype in self.added), self.slot)

    @property
    def name(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        data = {"sample": list(self.sample), "hidden": list(self.hidden), "dtype": self.dtype,
                "hidden_dtype": self.hidden_dtype, "timestep_dtype": self.timestep_dtype,
                "added": [[name, list(shape), dtype] for name, shape, dtype in self.added]}
        if self.slot is not None:  # only then: the bare forwards keep the names their packages were compiled under
            data["slot"] = self.slot.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ForwardShape":
        slot = SlotLayout.from_json(data["slot"]) if data.get("slot") else None
        return cls(tuple(data["sample"]), tuple(data["hidden"]), data["dtype"], data["hidden_dtype"],
                   data["timestep_dtype"], tuple((name, tuple(shape), dtype) for name, shape, dtype in data["added"]),
                   slot)

    def example_inputs(self, device, *, channels_last: bool) -> tuple:
        """Zeros of this shape, in the layout the forward gets them (`inputs_in_layout`): (sample, timestep, hidden,
        added)."""
        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=getattr(torch, dtype), device=device)

        added = {name: zeros(shape, dtype) for name, shape, dtype in self.added}
        return inputs_in_layout(zeros(self.sample, self.dtype), zeros((), self.timestep_dtype),
                                zeros(self.hidden, self.hidden_dtype), added, channels_last=channels_last)

    def random_inputs(self, device, *, channels_last: bool) -> tuple:
        """`example_inputs` filled the same way every time (normal latents and embeddings, timestep 500): the inputs
        a compiled forward is checked on against the eager one."""
        inputs = self.example_inputs(device, channels_last=channels_last)
        generator = torch.Generator(device=device).manual_seed(0)
        for tensor in (inputs[0], inputs[2], *inputs[3].values()):
            tensor.normal_(generator=generator)
        inputs[1].fill_(500)
        return inputs

    def random_mask(self, device) -> torch.Tensor:
        """A slot mask for this shape filled the same way every time (each row sees about half the ranks): what a
        slotted forward is checked with."""
        generator = torch.Generator(device=device).manual_seed(1)
        bits = torch.rand(self.sample[0], 1, self.slot.rank, generator=generator, device=device) < 0.5
        return bits.to(getattr(torch, self.slot.dtype))

    def describe(self) -> str:
        batch, _, height, width = self.sample
        mixed = f", members' LoRAs mixed (slot of rank {self.slot.rank})" if self.slot is not None else ""
        return f"{batch} rows of {height}x{width} latents, {self.hidden[1]} tokens{mixed}"


def inputs_in_layout(sample, timestep, hidden, added: dict, *, channels_last: bool) -> tuple:
    """The forward's inputs with the strides the compiled code assumes (it does not check them): the sample
    channels-last when the UNet is (as the CUDA graphs' static sample is), the rest contiguous, `added` sorted by
    name (the compiled code takes its tensors in that order)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return (sample.contiguous(memory_format=layout), timestep.reshape(()).contiguous(), hidden.contiguous(),
            {name: added[name].contiguous() for name in sorted(added)})


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.float(), reference.float()
    return ((output - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def too_far_off(error: float) -> str | None:
    """Why a compiled forward `error` (relative_error) off the eager one must not be used, or None."""
    if error <= COMPILED_TOLERANCE:
        return None
    return f"its output is {error:.2g} off the eager forward's (relative)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def architecture(unet) -> dict:
    """Everything a compiled forward depends on besides its shape: the UNet's config, its weights' dtype and memory
    format, the device, the library versions (kernels from one torch or GPU are not for another) and what the
    package returns. Not the weights' values: the worker supplies those at run time."""
    import diffusers

    from trainer.generation.deep_cache import DeepCache

    weight = unet.conv_in.weight
    device = weight.device
    gpu = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = [torch.cuda.get_device_name(index), list(torch.cuda.get_device_capability(index))]
    return {"config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
            "dtype": dtype_name(weight.dtype), "channels_last": channels_last(unet), "device": device.type, "gpu": gpu,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            # what a package returns: the noise, and the deep cache's feature where it fits (since 2026-12-03)
            "outputs": 2 if DeepCache.supported(unet) else 1}


def architecture_text(facts: dict) -> str:
    """`architecture()`'s facts as the key hashes them and a package folder records them."""
    return json.dumps(facts, sort_keys=True, default=str)


def key_of(facts: dict) -> str:
    return hashlib.sha256(architecture_text(facts).encode()).hexdigest()[:16]


def architecture_key(unet) -> str:
    return key_of(architecture(unet))


def channels_last(unet) -> bool:
    weight = unet.conv_in.weight
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
