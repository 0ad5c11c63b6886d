"""`python -m bench --family sdxl`: SDXL DreamBooth LoRA training, ours against diffusers' SDXL script's way, and the
peak GPU memory of training beside the resident model in each memory setting. Prints one JSON object.

On a GPU it builds a random-weight model of the SDXL base architecture (bench/sdxl.py), saved in fp16, and five
1024² photos, then runs the sections asked for (`--only`, default all):
  reference  bench/reference_sdxl.py: class images with the plain pipeline, then the script's loop (prior
             preservation and both text encoders' LoRA, as our default recipe; batch 1 = one instance + one class
             sample per step)
  ours       the worker's train job on the resident pipeline (bench/ours.py), the same samples seen, class images
             made by our engine: a cold run (class images made) and a warm one (cached), each with its timings
  memory     per BOOTHBOT_TRAIN_MEMORY setting (low, fast): the worker's peak GPU memory over a short training
             with cached class images: resident model (the service) + training
`--tiny` runs every section on the CPU with the tiny SDXL in seconds (tests/bench/test_sdxl_bench.py).
A section that fails is reported under "errors" and the others still run; the exit status is 1 then.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

SECTIONS = ("reference", "ours", "memory")
PHOTOS = 5
FULL = dict(steps=400, class_images=50, class_steps=50, memory_steps=30, rank=16)
TINY = dict(steps=2, class_images=2, class_steps=2, memory_steps=2, rank=4)
MEMORY_SETTINGS = ("low", "fast")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --family sdxl", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL on the CPU with small counts (CI)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    for name, help_text in (("steps", "reference steps at batch 1 = instance samples seen (ours: the same)"),
                            ("class-images", "prior-preservation class images"),
                            ("class-steps", "denoising steps per reference class image (the pipeline default: 50)"),
                            ("memory-steps", "training steps per memory setting"),
                            ("rank", "LoRA rank, both sides")):
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_text} (default {FULL[key]}; --tiny: {TINY[key]})")
    parser.add_argument("--ref-precision", default="auto", choices=("auto", "bf16", "fp16", "no"))
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--work-dir", default=None, help="where the model and outputs go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the libraries' own warnings and progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.models.loading import pick_device
    from trainer.quiet import quiet_libraries

    quiet_libraries(args.debug)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    device = "cpu" if args.tiny and args.device == "auto" else pick_device(args.device)
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit("bench: the SDXL-size benchmark needs a CUDA GPU; use --tiny to check the code paths on a CPU")
    sizes = {key: getattr(args, key) if getattr(args, key) is not None else value
             for key, value in (TINY if args.tiny else FULL).items()}
    precision = args.ref_precision
    if precision == "auto":
        import torch

        precision = "no" if not device.startswith("cuda") else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="bench-sdxl-") as tmp:
        report = SdxlTrainBench(Path(tmp), device, args.tiny, precision, args.seed, sizes).run(sections)
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    if args.json:
        args.json.write_text(text, encoding="utf-8")
    return 1 if report["errors"] else 0


class SdxlTrainBench:
    def __init__(self, root: Path, device: str, tiny: bool, precision: str, seed: int, sizes: dict):
        self.root, self.device, self.tiny, self.precision, self.seed, self.sizes = (
            root, device, tiny, precision, seed, sizes)
        self.resolution = 64 if tiny else 1024
        self.report: dict = {"family": "sdxl", "device": device, "tiny": tiny, "resolution": self.resolution,
                             "reference_precision": precision, **sizes, "errors": {}}

    def run(self, sections: list[str]) -> dict:
        from bench.report import environment

        self.report["environment"] = environment(self.device)
        started = time.perf_counter()
        self.model_dir, self.photos_dir = self._fixtures()
        self.report["fixtures_s"] = round(time.perf_counter() - started, 1)
        for section in sections:
            try:
                self.report[section] = getattr(self, f"_{section}")()
            except Exception as exc:  # noqa: BLE001 - every failure ends up in the report and the exit status
                print(f"bench: {section} failed:\n{''.join(traceback.format_exception(exc))}", file=sys.stderr)
                self.report["errors"][section] = f"{type(exc).__name__}: {exc}"
            _free()
        return self.report

    def _fixtures(self) -> tuple[Path, Path]:
        import torch

        from bench.fixtures import write_photos

        if self.tiny:
            from trainer.models.tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline(self.seed, family="sdxl")
        else:
            from bench.sdxl import build_sdxl_pipeline

            pipe = build_sdxl_pipeline(self.device, self.seed).to(dtype=torch.float16)  # half the disk and load time
        model_dir = self.root / "model"
        pipe.save_pretrained(str(model_dir), safe_serialization=True)
        self.report["unet_parameters_m"] = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)
        del pipe
        _free()
        photos_dir = self.root / "photos"
        write_photos(photos_dir, PHOTOS, self.resolution, self.seed)
        return model_dir, photos_dir

    def _reference(self) -> dict:
        from bench.reference_sdxl import ReferenceSdxlConfig, reference_train_sdxl
        from bench.timing import peak_memory, reset_peak_memory

        reset_peak_memory(self.device)
        phases = reference_train_sdxl(ReferenceSdxlConfig(
            model_dir=self.model_dir, photos_dir=self.photos_dir, work_dir=self.root / "reference",
            device=self.device, mixed_precision=self.precision, resolution=self.resolution,
            max_train_steps=self.sizes["steps"], num_class_images=self.sizes["class_images"],
            class_inference_steps=self.sizes["class_steps"], rank=self.sizes["rank"], seed=self.seed))
        phases["peak_memory"] = peak_memory(self.device)
        return phases

    def _worker(self):
        from bench.ours import OursWorker

        return OursWorker(self.model_dir, self.device, self.root / "ours-data")

    def _train(self, worker, concept_id: int, steps: int) -> dict:
        from bench.ours import train_params

        params = train_params(concept_id, f"benchme{concept_id}", self.photos_dir,
                              self.root / "ours-data" / "concepts" / str(concept_id), steps=steps, seed=self.seed,
                              class_images=self.sizes["class_images"])
        params.update(rank=self.sizes["rank"], sample_count=0 if self.tiny else 4)
        result, seconds, slices = worker.run("train", params)
        return {"seconds": round(seconds, 2), "slices": slices, "steps": result.get("steps"),
                "timings": result.get("timings"), "graph_steps": result.get("graph_steps")}

    def _ours(self) -> dict:
        from bench.ours import train_steps_for
        from bench.timing import peak_memory, reset_peak_memory

        reset_peak_memory(self.device)
        worker = self._worker()
        worker.worker.train_memory = "fast"
        steps = train_steps_for(self.sizes["steps"])
        out = {"memory_setting": "fast", "train_cold": self._train(worker, 101, steps)}
        if not self.tiny:
            out["train_warm"] = self._train(worker, 102, steps)
        out["peak_memory"] = peak_memory(self.device)
        return out

    def _memory(self) -> dict:
        from bench.timing import peak_memory, reset_peak_memory

        worker = self._worker()
        out = {"resident_gb": _allocated_gb(self.device)}
        self._train(worker, 200, 1)  # class images into the cache: their generation is not what is measured here
        for index, setting in enumerate(MEMORY_SETTINGS):
            worker.worker.train_memory = setting
            reset_peak_memory(self.device)
            run = self._train(worker, 201 + index, self.sizes["memory_steps"])
            out[setting] = {**run, "peak_memory": peak_memory(self.device),
                            "step_s": round(run["timings"]["steps"] / max(1, run["steps"]), 4)}
        return out


def _allocated_gb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.memory_allocated() / 1e9, 2)


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
