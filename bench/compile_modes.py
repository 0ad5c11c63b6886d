"""`python -m bench.compile_modes`: what each way of compiling the /imagine UNet costs once and gives per image.

Modes (trainer/generation/fast_unet.py): `none` (CUDA graphs of the eager kernels), `full` (inductor's kernels for
the whole forward inside the graphs, the worker's --compile-unet) and `ahead` (the worker's --compile-ahead,
trainer/generation/aot_kernels.py: the first requests run on the eager graphs while a separate process compiles
their shapes; then the idle worker adopts the packages and the rest run on them). A third, `regional`
(diffusers' regional compile: the repeated transformer blocks only), was measured at commit 1587276 and left out
(docs/BENCHMARKS.md).
Each mode runs in its own process on the SD 1.5-architecture random model (fp16, 512², 30 steps, CFG 7, no LoRA):
first with an empty inductor cache, then again with the cache the first run left (a restarted worker). Reports per
run: the first /imagine (compile + graph capture), the median of `--repeats` /imagine after it, the first batch of 8
and the images/s of batches of 8 after it; `ahead` also the /imagine p50 while the other process compiles, how long
it compiled and how long adopting took (loading + graph capture). Prints JSON. Needs a CUDA GPU (`--tiny`: the code path on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("none", "full", "ahead")


def _pipeline(tiny: bool, root: Path):
    """(pipeline, side, sampler steps): SD 1.5's architecture on the GPU, or the tiny model on the CPU (--tiny: the
    code path only, for CI; nothing is compiled off CUDA)."""
    import torch

    if tiny:
        from trainer.models.loading import load_pipeline
        from trainer.models.tiny import make_tiny_model

        return load_pipeline(str(make_tiny_model(root / "model")), "cpu", "auto"), 64, 2
    from bench.sd15 import build_sd15_pipeline

    return build_sd15_pipeline("cuda").to(dtype=torch.float16), 512, 30


def _one(mode: str, repeats: int, out_dir: Path, tiny: bool) -> dict:
    import torch

    from trainer.generation.service import GenerationService, ImagineRequest

    pipe, side, steps = _pipeline(tiny, out_dir)
    aot_dir = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "aot" if mode == "ahead" else None  # kept like inductor's
    service = GenerationService(pipe, model_name="compile-modes", compile_unet=mode == "full", aot_dir=aot_dir)
    if service.aot is not None:  # as a worker at its first idle moment once torch's loader is prepared:
        service.aot.loader_ready.wait()
        service.idle()  # the packages an earlier run compiled are adopted
    counter = iter(range(10**6))
    cuda = pipe.device.type == "cuda"

    def request(seed: int) -> ImagineRequest:
        return ImagineRequest.from_params({"prompt": "a photo of a man on a beach", "seed": seed, "steps": steps,
                                           "cfg": 7, "width": side, "height": side,
                                           "out_dir": str(out_dir / f"r{next(counter)}")})

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    first = timed(lambda: service.imagine(request(0)))
    ahead = {}
    if service.aot is not None:
        ahead = _compile_ahead(service, lambda: timed(lambda: service.imagine(request(1))), repeats)
    single = [timed(lambda: service.imagine(request(i))) for i in range(repeats)]
    first_batch = timed(lambda: service.imagine_many([request(i) for i in range(8)]))
    batches = [timed(lambda: service.imagine_many([request(i) for i in range(8)])) for _ in range(3)]
    return {"mode": mode, "first_imagine_s": round(first, 2), "imagine_p50_s": round(statistics.median(single), 4),
            "first_batch8_s": round(first_batch, 2), "batch8_images_per_s": round(8 / statistics.median(batches), 2),
            "captures": service.graphs.captures if service.graphs else 0, **ahead,
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def _compile_ahead(service, one_imagine, repeats: int) -> dict:
    """Serve while the other process compiles (the first /imagine asked for its shape and the batch-of-8 one), wait
    for it, then adopt as the idle worker does."""
    began = time.perf_counter()
    while_compiling = []
    while service.aot.compiling and len(while_compiling) < repeats:
        while_compiling.append(one_imagine())
    service.aot.wait()
    compiled_s = time.perf_counter() - began
    service.aot.loader_ready.wait()  # the worker adopts when idle and its loader is prepared (aot_kernels.py)
    began = time.perf_counter()
    service.idle()
    return {"imagine_p50_while_compiling_s": round(statistics.median(while_compiling), 4) if while_compiling else None,
            "compile_process_s": round(compiled_s, 1) if service.aot.compiles_started else 0.0,
            "adopt_s": round(time.perf_counter() - began, 2), "compiled_shapes": len(service.aot.loaded),
            "refused": service.aot.refused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_modes", description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: the code path only (CI)")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child: one mode, prints one JSON line
    args = parser.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_one(args.one, args.repeats, Path(tmp), args.tiny)), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-modes-") as tmp:
        for mode in args.modes.split(","):
            cache = Path(tmp) / mode
            for run in ("cold", "kept cache") if mode != "none" else ("cold",):
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
                began = time.perf_counter()
                # faulthandler: a native crash (a segfault in torch's package loader was one) names its Python line
                child = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "bench.compile_modes",
                                        "--one", mode, "--repeats", str(args.repeats),
                                        *(["--tiny"] if args.tiny else [])],
                                       env=env, capture_output=True, text=True)
                row = {"run": run, "process_s": round(time.perf_counter() - began, 1)}
                if child.returncode == 0:
                    row.update(json.loads(child.stdout.strip().splitlines()[-1]))
                else:
                    crash = child.stderr.split("\nExtension modules:")[0]  # faulthandler's list of every module
                    row.update(mode=mode, returncode=child.returncode, error=crash[-3000:])
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
