"""Several base models in one worker (trainer/models/resident.py): what a model costs to load, to switch to while it is
resident, and to switch to after it was evicted, and whether the free-memory rule evicts by what the GPU measures.

    python -m bench.model_switch --device cuda --size full   # SD 1.5 + SDXL architectures, random weights, fp16
    python -m bench.model_switch --device cpu --size tiny    # the tiny models (CI's check of this module)

Prints one JSON object. The models are saved as diffusers folders first (fp16 on disk, as downloads are), so a load
reads files the way the worker does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def save_models(size: str, device: str, root: Path) -> dict[str, str]:
    import torch

    if size == "tiny":
        from trainer.models.tiny import make_tiny_model

        return {"sd1": str(make_tiny_model(root / "sd1")), "sdxl": str(make_tiny_model(root / "sdxl", family="sdxl"))}
    from bench.sd15 import build_sd15_pipeline
    from bench.sdxl import build_sdxl_pipeline

    catalog = {}
    for name, build in (("sd1", build_sd15_pipeline), ("sdxl", build_sdxl_pipeline)):
        pipe = build(device=device).to(torch.float16)
        pipe.save_pretrained(root / name)
        del pipe
        catalog[name] = str(root / name)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return catalog


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return round(time.perf_counter() - started, 3)


def measure(catalog: dict[str, str], device: str, dtype: str) -> dict:
    from trainer.models.resident import ResidentModels

    report: dict = {}
    both = ResidentModels(catalog, device=device, dtype=dtype, keep=2)
    both.survey()
    report["families"] = {entry["name"]: entry["family"] for entry in both.facts()}
    report["cold_load_s"] = {name: timed(lambda name=name: both.get(name)) for name in catalog}
    report["footprint_gib"] = {name: round(both.get(name).footprint / 2**30, 2) for name in catalog}
    report["switch_resident_s"] = timed(lambda: both.get("sd1"))  # both resident: no load
    report["resident_after_keep_2"] = both.resident_names()
    both.evict_all()

    one = ResidentModels(catalog, device=device, dtype=dtype, keep=1)
    one.survey()
    one.get("sd1")
    report["switch_with_eviction_s"] = timed(lambda: one.get("sdxl"))
    report["resident_after_keep_1"] = one.resident_names()
    one.evict_all()
    report["memory_rule"] = memory_rule(catalog, device, dtype)
    return report


def memory_rule(catalog: dict[str, str], device: str, dtype: str) -> dict | None:
    """keep=3, then ballast that leaves less free memory than the SDXL model needs: loading it must evict sd1 by
    the measured free memory (not by the count)."""
    if not device.startswith("cuda"):
        return None
    import torch

    from trainer.models.resident import ResidentModels

    models = ResidentModels(catalog, device=device, dtype=dtype, keep=3)
    models.survey()
    models.get("sd1")
    need = models.expected_bytes("sdxl")
    free = models.measure_free_memory()
    ballast = torch.empty(max(0, free - need // 2), dtype=torch.uint8, device=device)
    free_before = models.measure_free_memory()
    models.get("sdxl")
    result = {"need_gib": round(need / 2**30, 2), "free_before_gib": round(free_before / 2**30, 2),
              "resident_after": models.resident_names(), "evicted_by_memory": "sd1" not in models.resident_names()}
    del ballast
    models.evict_all()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_switch", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--models-dir", help="where to save the models (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models_dir or tmp)
        catalog = save_models(args.size, args.device, root)
        report = {"device": args.device, "size": args.size, **measure(catalog, args.device, args.dtype)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
