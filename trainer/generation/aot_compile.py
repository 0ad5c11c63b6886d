"""Compile the UNet forward ahead of time, one package per shape, in a process of its own.

    python -m trainer.generation.aot_compile SPEC.json

The worker (trainer/generation/aot_kernels.py) starts this for the shapes its members use, so that nobody waits for
a compile (a minute per shape for SD 1.5 on an H200). For each shape: `torch.export` of the forward, then
AOTInductor (`torch._inductor.aoti_compile_and_package`) into `<shape>.pt2`, with the weights left out of the package:
the worker points the compiled code at its own live weights (folded LoRAs included). So the UNet here is built from
the config alone, with random weights; what must match is each weight's shape, dtype and strides, which
`<shape>.json` records for the worker to check. A shape with a `slot` is compiled on a UNet holding generation's
mixed-LoRA slot of that layout (random LoRA weights here too; the mask is an input).

Before the worker may load a package, this process loads it the same way (weights bound by reference) and checks
one forward against its own eager one: loading a package has crashed the process doing it (a segfault inside
torch's loader, SD 1.5 on an H200 with torch 2.11, docs/BENCHMARKS.md), and that must never be the worker. While
checking, `<shape>.checking` holds this process's pid; a later run that finds it with the process gone knows the
check crashed. The JSON is written last: it says the package is complete and checked. A shape that cannot be
compiled or checked gets `<shape>.failed`, its first line the reason, so the worker does not ask again.

SPEC: {"config": the UNet's config, "dtype", "channels_last", "device", "out_dir", "shapes": [ForwardShape JSON],
"parent": the worker's pid (this process stops between shapes once the worker is gone)}.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from trainer.generation.aot_kernels import bind_by_reference, live_constants, load_package
from trainer.generation.aot_shapes import ForwardShape, SlotLayout, dtype_name, relative_error, too_far_off
from trainer.generation.aot_toolchain import choose_compiler, use_compiler
from trainer.generation.deep_cache import DeepCache

# Weights out of the package, and none inlined into the kernels (inductor inlines small ones by default, e.g. the 4
# numbers of conv_out's bias: those would keep the random values of this process).
INDUCTOR_OPTIONS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}


class UNetForward(torch.nn.Module):
    """The forward the worker's CUDA graphs call (trainer/generation/fast_unet.py `_eager_whole`), as a module to
    export: (noise, the deep cache's feature), or (noise,) for a UNet the deep cache does not fit. With `slot`: the
    UNet holds generation's mixed-LoRA slot, active (its weights random here, the worker's own at run time), and the
    forward takes the slot's mask as a fifth input."""

    def __init__(self, unet, slot: SlotLayout | None = None):
        super().__init__()
        self.unet = unet
        self.slot = slot
        self.deep = DeepCache(unet) if DeepCache.supported(unet) else None
        self._mask: list = [None]
        if slot is not None:
            from trainer.generation.lora_slots import SLOT_NAME, add_slot, slot_layout

            layers, _ = add_slot(unet, list(slot.targets), slot.rank, lambda: self._mask[0])
            if slot_layout(layers) != slot:
                raise CheckFailed(f"this UNet's slot came out as {slot_layout(layers)}, not as asked")
            for layer in layers.values():
                layer.set_adapter([SLOT_NAME], inference_mode=True)

    def forward(self, sample, timestep, hidden, added: dict, mask=None) -> tuple:
        self._mask[0] = mask
        try:
            if self.deep is None:
                return (self.unet(sample, timestep, hidden, added_cond_kwargs=added or None, return_dict=False)[0],)
            return self.deep.whole(sample, timestep, hidden, added)
        finally:
            self._mask[0] = None

    def example_inputs(self, shape: ForwardShape, *, channels_last: bool, random: bool = False) -> tuple:
        device = next(self.parameters()).device
        if random:
            inputs = shape.random_inputs(device, channels_last=channels_last)
        else:
            inputs = shape.example_inputs(device, channels_last=channels_last)
        return inputs if shape.slot is None else (*inputs, shape.random_mask(device))


def build_unet(spec: dict):
    from diffusers import UNet2DConditionModel

    with torch.device(spec["device"]):
        unet = UNet2DConditionModel.from_config(spec["config"])
    unet.to(dtype=getattr(torch, spec["dtype"]))
    if spec["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    return unet.eval().requires_grad_(False)


def constants_layout(module: torch.nn.Module) -> dict[str, list]:
    """name -> [shape, stride, dtype] of every weight and buffer, as the compiled code will expect them."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {name: [list(t.shape), list(t.stride()), dtype_name(t.dtype)] for name, t in tensors.items()}


class CheckFailed(Exception):
    """The package was built but must not be used (the reason is the message)."""


def compile_shape(module: UNetForward, shape: ForwardShape, out_dir: Path, *, channels_last: bool) -> Path:
    inputs = module.example_inputs(shape, channels_last=channels_last)
    started = time.monotonic()
    with torch.no_grad():
        program = torch.export.export(module, inputs, strict=False)
    exported = time.monotonic()
    partial = out_dir / f".{shape.name}.{os.getpid()}.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                 inductor_configs=INDUCTOR_OPTIONS)
        package = out_dir / f"{shape.name}.pt2"
        os.replace(partial, package)
    finally:
        partial.unlink(missing_ok=True)
    compiled = time.monotonic()
    checking = out_dir / f"{shape.name}.checking"
    _write_atomically(checking, str(os.getpid()))
    try:
        problem = check_package(module, shape, package, channels_last=channels_last)
    finally:
        checking.unlink(missing_ok=True)  # a crash leaves it (above); an exception is a reason like any other
    if problem is not None:
        raise CheckFailed(problem)
    meta = {"shape": shape.to_json(), "constants": constants_layout(module), "torch": torch.__version__,
            "export_s": round(exported - started, 2), "compile_s": round(compiled - exported, 2),
            "check_s": round(time.monotonic() - compiled, 2)}
    _write_atomically(out_dir / f"{shape.name}.json", json.dumps(meta))
    return package


def check_package(module: UNetForward, shape: ForwardShape, package: Path, *, channels_last: bool) -> str | None:
    """Load `package` as the worker does, bind this process's weights to it by reference and compare one forward on
    random inputs with the eager one: why it must not be used, or None."""
    device = next(module.parameters()).device
    try:
        model = load_package(package, device)
        bind_by_reference(model, live_constants(module.unet, shape.slot), model.get_constant_fqns())
        inputs = module.example_inputs(shape, channels_last=channels_last, random=True)
        with torch.no_grad():
            output = model(*inputs)
            eager = module(*inputs)
    except torch.OutOfMemoryError:
        raise  # beside a training: worth another try
    except Exception as exc:  # noqa: BLE001 - any failure to load or run it is a reason not to use it
        return f"loading and running it failed: {type(exc).__name__}: {exc}"
    output = tuple(output) if isinstance(output, (list, tuple)) else (output,)
    if len(output) != len(eager):
        return f"it returns {len(output)} tensor(s), the eager forward {len(eager)}"
    return too_far_off(max(relative_error(out, reference) for out, reference in zip(output, eager)))


def crashed_while_checking(out_dir: Path, shape: ForwardShape) -> bool:
    """An earlier process died checking this shape's package (its marker stayed, its pid is gone)."""
    try:
        pid = int((out_dir / f"{shape.name}.checking").read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def pick_compiler(out_dir: Path) -> str | None:
    """Make inductor build with a compiler whose libraries load beside torch (aot_toolchain.py); None when no
    compiler here does, else the compiler."""
    compiler, refused = choose_compiler(out_dir / "toolchain")
    for line in refused:
        print(f"aot_compile: not compiling with {line}", file=sys.stderr, flush=True)
    if compiler is not None:
        if refused:
            print(f"aot_compile: compiling with {compiler}", file=sys.stderr, flush=True)
        use_compiler(compiler)
    return compiler


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)


def _record_failure(out_dir: Path, name: str, reason: str, detail: str = "") -> None:
    """`<name>.failed`: the reason on its first line (the worker quotes it), then any detail."""
    _write_atomically(out_dir / f"{name}.failed", f"{reason}\n\n{detail}" if detail else f"{reason}\n")


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.nice(10)  # compiling is CPU work the worker's own jobs (data loading, PNGs) should win against
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the worker stopping us: partial files are removed on the way

    def worker_gone() -> bool:
        if spec.get("parent") and os.getppid() != spec["parent"]:
            print("aot_compile: the worker is gone; stopping", file=sys.stderr, flush=True)
            return True
        return False

    if worker_gone():
        return 0
    module = None
    compiler_checked = False
    # The bare forwards first, then each slot's: one UNet (with that slot, or none) at a time.
    shapes = sorted((ForwardShape.from_json(data) for data in spec["shapes"]),
                    key=lambda shape: json.dumps(shape.slot.to_json()) if shape.slot is not None else "")
    for shape in shapes:
        if worker_gone():
            return 0
        if (out_dir / f"{shape.name}.json").exists():
            continue
        if crashed_while_checking(out_dir, shape):
            _record_failure(out_dir, shape.name, f"loading its compiled package crashed the process that checked it "
                                                 f"(torch {torch.__version__}; see compile.log)")
            (out_dir / f"{shape.name}.checking").unlink(missing_ok=True)
            print(f"aot_compile: {shape.name}: an earlier check crashed; not used", file=sys.stderr, flush=True)
            continue
        if not compiler_checked:
            compiler_checked = True
            if pick_compiler(out_dir) is None:
                for pending in spec["shapes"]:
                    name = ForwardShape.from_json(pending).name
                    if not (out_dir / f"{name}.json").exists():
                        _record_failure(out_dir, name, "no C++ compiler here builds packages that load beside torch "
                                                       "(see compile.log; set CXX to one that does)")
                return 0
        print(f"aot_compile: {shape.name}: {shape.describe()} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        if module is None or module.slot != shape.slot:  # (a UNet that cannot be built ends the process)
            module = None  # the last one's memory first
            module = UNetForward(build_unet(spec), shape.slot)
        try:
            compile_shape(module, shape, out_dir, channels_last=spec["channels_last"])
        except Exception as exc:  # noqa: BLE001 - one shape that cannot compile must not stop the others
            reason = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            detail = "".join(traceback.format_exception(exc))
            print(f"aot_compile: {shape.name} failed:\n{detail}", file=sys.stderr, flush=True)
            if not isinstance(exc, torch.OutOfMemoryError):  # beside a training: worth another try after a restart
                _record_failure(out_dir, shape.name, (reason.splitlines() or [""])[0], detail)
            continue
        print(f"aot_compile: {shape.name} done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
