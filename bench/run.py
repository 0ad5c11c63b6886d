"""`python -m bench`: ours against the plain diffusers way, measured in the same command, with the ratio.

On a GPU it builds a random-weight model of the exact SD 1.5 architecture (bench/sd15.py; speed depends on the
architecture, not the weights), five 512² photos and eight members' LoRAs, then measures:
  train       one concept, 400 instance + 400 prior samples, text-encoder LoRA; reference = train_dreambooth_lora.py's
              way (bench/reference.py), ours = the worker's job runner with the model resident
  imagine     512², 30 steps, CFG 7, one image, a LoRA active; reference = fp16 StableDiffusionPipeline + LoRA
  throughput  8 requests from 8 members with 8 different LoRAs, images/s
  switch      moving from one member's LoRA to another's
  profile     where the time goes on the resident pipeline (component timings, GPU-busy fractions)
Peak VRAM is recorded for whatever runs. `--tiny` runs the same code paths on the CPU with the tiny model in seconds.
`--family sdxl`: the same /imagine sections (imagine, throughput, switch) on a random-weight SDXL base architecture
(bench/sdxl.py) at 1024², the reference being a plain fp16 StableDiffusionXLPipeline with the LoRA loaded.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.contract.imagine_request import DEFAULT_DEEP_CACHE

SETTLED_ROUNDS = 3  # ours' throughput: rounds timed after the first (its median is the figure)

SECTIONS = ("train", "imagine", "throughput", "switch", "profile")
FAMILY_SECTIONS = {"sd1": SECTIONS, "sdxl": ("imagine", "throughput", "switch")}  # what each family's bench measures
FULL = dict(steps=400, class_images=50, class_steps=50, imagine_steps=30, switch_steps=4, repeats=5, requests=8,
            lora_rank=16, ours_steps=None, ours_batch=None)
TINY = dict(steps=2, class_images=2, class_steps=2, imagine_steps=2, switch_steps=1, repeats=1, requests=2,
            lora_rank=4, ours_steps=2, ours_batch=None)
PHOTOS = 5
CFG_SCALE = 7.0
SETTLE_TIMEOUT_S = 600.0  # compiling a shape takes about a minute on an H200


@dataclass
class BenchConfig:
    tiny: bool
    device: str
    sections: tuple[str, ...]
    steps: int  # reference optimisation steps at batch 1 = instance samples seen = prior samples seen
    class_images: int
    class_steps: int
    imagine_steps: int
    switch_steps: int
    repeats: int
    requests: int
    lora_rank: int
    ours_steps: int | None  # passed as the train job's `steps`; None = the engine's default recipe
    ours_batch: int | None  # passed as the train job's `batch_size` (a recipe change); None = the engine's default
    ref_precision: str
    seed: int = 0
    compile_unet: bool = False  # the worker's --compile-unet (BOOTHBOT_COMPILE_UNET)
    deep_cache: int = DEFAULT_DEEP_CACHE  # the worker's --deep-cache (BOOTHBOT_DEEP_CACHE): ours' /imagine
    settle: bool = True  # time /imagine once the forwards compiled ahead of time are adopted (`_settle`)
    family: str = "sd1"  # "sd1" | "sdxl" (trainer/contract/families.py)
    resolution: int = 512
    model: str = ""
    work_dir: str | None = None
    extra: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model on the CPU with small counts: checks the code paths in seconds (CI)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections to run (default all the family has): {', '.join(SECTIONS)}")
    parser.add_argument("--family", default="sd1", choices=tuple(FAMILY_SECTIONS),
                        help="model architecture: sd1 (SD 1.5, 512²) or sdxl (SDXL base, 1024²): with --only "
                             "imagine,throughput,switch those sections here, otherwise the SDXL training bench "
                             "(python -m bench --family sdxl --help)")
    parser.add_argument("--json", type=Path, help="also write the full results as JSON to this file")
    for name, help_text in (
        ("steps", "reference training steps at batch 1 = instance and prior samples seen"),
        ("class-images", "class images the reference generates for prior preservation"),
        ("class-steps", "denoising steps per reference class image (the pipeline default is 50)"),
        ("imagine-steps", "denoising steps per /imagine image"),
        ("switch-steps", "denoising steps of the small requests that time a LoRA switch in our service"),
        ("repeats", "timed repetitions per latency figure (the median is reported)"),
        ("requests", "requests (members, each with their own LoRA) in the throughput test"),
        ("lora-rank", "rank of the synthetic members' LoRAs"),
        ("ours-steps", "`steps` of our train job (default: the engine's own recipe; --tiny: 3)"),
        ("ours-batch", "`batch_size` of our train job, steps scaled so the same samples are seen: a recipe change, "
                       "reported as one"),
    ):
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_text} (default {FULL[key]}; --tiny: {TINY[key]})")
    parser.add_argument("--ref-precision", default="auto", choices=("auto", "bf16", "fp16", "no"),
                        help="reference training mixed precision (auto: bf16 where supported, else fp16; no on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; --tiny: 1, because OpenMP threads "
                             "spinning on a shared, busy CPU made tiny runs over ten times slower)")
    parser.add_argument("--no-settle", dest="settle", action="store_false",
                        help="time ours right away instead of as a running bot serves after its first minutes: by "
                             "default, where the worker compiles ahead of time (a GPU of 22 GB or more), the timed "
                             "/imagine and throughput runs wait until the forwards the first requests used are "
                             "compiled and adopted (the wait is reported)")
    parser.add_argument("--deep-cache", type=int, default=DEFAULT_DEEP_CACHE, metavar="N",
                        help="ours with the worker's --deep-cache N (BOOTHBOT_DEEP_CACHE): a whole UNet forward every "
                             "N-th sampler step of an /imagine (1: off, every step whole as the reference; default "
                             "%(default)s, the bot's)")
    parser.add_argument("--compile-unet", action="store_true",
                        help="ours with the worker's --compile-unet (BOOTHBOT_COMPILE_UNET=1): torch.compile inside the "
                             "CUDA graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where temporary files go (default: the system temp dir)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from trainer.models.loading import pick_device

    family = getattr(args, "family", "sd1")
    offered = FAMILY_SECTIONS[family]
    sections = tuple(s.strip() for s in (args.only or ",".join(offered)).split(",") if s.strip())
    unknown = [s for s in sections if s not in offered]
    if unknown:
        raise SystemExit(f"bench: unknown section(s) {', '.join(unknown)} for --family {family}; "
                         f"choose from {', '.join(offered)}")
    device = "cpu" if args.tiny and args.device == "auto" else pick_device(args.device)
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit("bench: the SD 1.5-size benchmark needs a CUDA GPU (it would take hours on a CPU); "
                         "use --tiny to check the code paths on a CPU")
    sizes = dict(TINY if args.tiny else FULL)
    for key in sizes:
        value = getattr(args, key)
        if value is not None:
            sizes[key] = value
    precision = args.ref_precision
    if precision == "auto":
        import torch

        precision = "no" if not device.startswith("cuda") else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    full_side, label = {"sd1": (512, "SD 1.5"), "sdxl": (1024, "SDXL base")}[family]
    return BenchConfig(tiny=args.tiny, device=device, sections=sections, ref_precision=precision, seed=args.seed,
                       compile_unet=args.compile_unet, deep_cache=args.deep_cache, settle=args.settle, family=family,
                       resolution=64 if args.tiny else full_side, work_dir=args.work_dir,
                       model=(f"tiny random {family} (64 px)" if args.tiny
                              else f"random-weight {label} architecture ({full_side} px)"),
                       **sizes)


@dataclass
class Fixtures:
    model_dir: Path
    photos_dir: Path
    loras: list[Path]
    root: Path


def prepare_fixtures(cfg: BenchConfig, root: Path) -> Fixtures:
    """Save the base model, write the photos and the members' LoRAs (untimed set-up)."""
    import torch

    from bench.fixtures import write_photos, write_random_loras

    if cfg.tiny:
        from trainer.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(cfg.seed, family=cfg.family)
    elif cfg.family == "sdxl":
        from bench.sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(cfg.device, cfg.seed).to(dtype=torch.float16)  # half the bytes to save and load
    else:
        from bench.sd15 import build_sd15_pipeline

        pipe = build_sd15_pipeline(cfg.device, cfg.seed)
    model_dir = root / "model"
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    loras = write_random_loras(pipe, root / "loras", max(cfg.requests, 2), cfg.lora_rank, cfg.seed)
    photos_dir = root / "photos"
    write_photos(photos_dir, PHOTOS, cfg.resolution, cfg.seed)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Fixtures(model_dir, photos_dir, loras, root)


class Bench:
    def __init__(self, cfg: BenchConfig, fx: Fixtures, on_section=None):
        self.cfg, self.fx = cfg, fx
        self.results: dict = {}
        self.errors: dict[str, str] = {}
        self.on_section = on_section or (lambda bench: None)

    def attempt(self, where: str, fn, *args, **kwargs):
        """Run one measurement; a failure is recorded (and printed) without losing the others."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure ends up in the report and the exit status
            detail = "".join(traceback.format_exception(exc))
            print(f"bench: {where} failed:\n{detail}", file=sys.stderr, flush=True)
            self.errors[where] = f"{type(exc).__name__}: {exc}"
            return None

    def wants(self, *sections: str) -> bool:
        return any(s in self.cfg.sections for s in sections)

    # --- reference -----------------------------------------------------------------------------------------
    def reference_training(self) -> dict:
        from bench.reference import ReferenceTrainConfig, reference_train
        from bench.timing import peak_memory, reset_peak_memory

        cfg = self.cfg
        reset_peak_memory(cfg.device)
        phases = reference_train(ReferenceTrainConfig(
            model_dir=self.fx.model_dir, photos_dir=self.fx.photos_dir, work_dir=self.fx.root / "reference-train",
            device=cfg.device, mixed_precision=cfg.ref_precision, resolution=cfg.resolution,
            max_train_steps=cfg.steps, num_class_images=cfg.class_images, class_inference_steps=cfg.class_steps,
            seed=cfg.seed))
        phases["peak_memory"] = peak_memory(cfg.device)
        return phases

    def reference_serving(self) -> dict:
        from bench.reference import ReferenceImagine, reference_cached_switch
        from bench.timing import median, peak_memory, repeat, reset_peak_memory, timed

        cfg, loras = self.cfg, self.fx.loras
        out: dict = {}
        reset_peak_memory(cfg.device)
        ref = ReferenceImagine(self.fx.model_dir, cfg.device)
        try:
            ref.use_lora(loras[0])

            def one(seed=cfg.seed, steps=cfg.imagine_steps):
                return ref.imagine("a portrait photo of sks man", steps=steps, cfg=CFG_SCALE, size=cfg.resolution,
                                   seed=seed)

            if self.wants("imagine"):
                runs = repeat(cfg.device, one, warmup=2, repeats=cfg.repeats)
                out["imagine_s"], out["imagine_runs_s"] = median(runs), runs
            if self.wants("throughput"):
                one()  # warm
                rounds = []
                for _ in range(2):
                    seconds = 0.0
                    for i in range(cfg.requests):
                        seconds += ref.use_lora(loras[i % len(loras)])
                        seconds += timed(cfg.device, one, cfg.seed + i)[0]
                    rounds.append(seconds)
                out["throughput_round_s"] = rounds
                out["throughput_ips"] = cfg.requests / min(rounds)
            if self.wants("switch"):
                switches = [ref.use_lora(loras[i % 2]) for i in range(1, 2 * cfg.repeats + 1)]
                out["switch_unload_load_ms"] = median(switches) * 1e3
                cached = reference_cached_switch(ref, loras[:2], 2 * cfg.repeats)
                out["switch_set_adapters_ms"] = median(cached) * 1e3
            out["peak_memory"] = peak_memory(cfg.device)
        finally:
            ref.close()
        return out

    # --- ours ------------------------------------------------------------------------------------------------
    def ours(self) -> dict:
        from bench.ours import OursWorker, imagine_params, train_params, train_steps_for
        from bench.timing import median, peak_memory, reset_peak_memory

        cfg, loras = self.cfg, self.fx.loras
        out: dict = {}
        need = {"imagine": self.wants("imagine", "throughput", "switch"), "train": self.wants("train")}
        if not any(need.values()):
            return out
        data_dir = self.fx.root / "ours-data"
        reset_peak_memory(cfg.device)
        worker = OursWorker(self.fx.model_dir, cfg.device, data_dir, compile_unet=cfg.compile_unet,
                            deep_cache=cfg.deep_cache)
        images_dir = data_dir / "images"

        def imagine(concepts, seed=cfg.seed, steps=cfg.imagine_steps):
            params = imagine_params(concepts, images_dir, steps=steps, cfg=CFG_SCALE, size=cfg.resolution, seed=seed)
            return worker.run("imagine", params)

        member = [(i + 1, f"membr{i}", path) for i, path in enumerate(loras)]
        if need["imagine"]:
            if self.wants("imagine"):
                out["imagine_first_s"] = imagine([member[0]])[1]
                out.update(self._settle(worker, "imagine"))
                imagine([member[0]])
                runs = [imagine([member[0]], cfg.seed + i)[1] for i in range(cfg.repeats)]
                out["imagine_s"], out["imagine_runs_s"] = median(runs), runs
            if self.wants("throughput"):
                out.update(self.attempt("ours throughput", self._ours_throughput, worker, imagine, member) or {})
            if self.wants("switch"):
                out.update(self._ours_switch(imagine, worker, member))
        if need["train"]:
            steps = cfg.ours_steps or train_steps_for(cfg.steps, cfg.ours_batch)
            # --tiny skips the warm-cache run: same code path minus class images, and CI time is short.
            runs = (("train_cold", 101),) if cfg.tiny else (("train_cold", 101), ("train_warm", 102))
            for label, concept_id in runs:
                token = f"benchme{concept_id}"
                params = train_params(concept_id, token, self.fx.photos_dir, data_dir / "concepts" / str(concept_id),
                                      steps=steps, seed=cfg.seed, class_images=cfg.class_images,
                                      batch_size=cfg.ours_batch)
                result, seconds, slices = worker.run("train", params)
                lora = Path(result["lora"])
                if not lora.is_file():
                    raise RuntimeError(f"the train job reported {lora} but no such file exists")
                out[label] = {"seconds": seconds, "lora_saved_s": lora.stat().st_mtime - worker.started_at,
                              "slices": slices, "steps": result.get("steps"), "engine_seconds": result.get("seconds"),
                              "samples": len(result.get("samples") or []),
                              "timings": result.get("timings"), "graph_steps": result.get("graph_steps")}
            if need["imagine"]:
                trained = (concept_id, f"benchme{concept_id}", lora)
                out["imagine_after_training_s"] = imagine([trained])[1]
        out["peak_memory"] = peak_memory(cfg.device)
        return out

    def _ours_switch(self, imagine, worker, member) -> dict:
        """Direct: what every request does around its denoising loop to move from A's LoRA to B's (both cached):
        look B up in the service's adapter cache, activate it, deactivate after. Indirect (noisy): extra latency
        of small requests that alternate A/B over ones that repeat A."""
        from bench.ours import lora_switch
        from bench.timing import median, timed

        cfg, (a, b) = self.cfg, member[:2]
        out: dict = {}
        imagine([a], steps=cfg.switch_steps)
        imagine([b], steps=cfg.switch_steps)
        rounds = max(4, 2 * cfg.repeats)
        service = worker.worker.generation
        out["switch_ms"] = median([timed(cfg.device, lora_switch, service, (a, b)[i % 2][2], (a, b)[i % 2][1])[0]
                                   for i in range(rounds)]) * 1e3
        out["switch_method"] = ("LoRA cache lookup + the LoRA folded into the text encoder, then the UNet, and restored "
                                "(what every single-LoRA request does around its loop)")
        same = [imagine([a], cfg.seed + i, cfg.switch_steps)[1] for i in range(rounds)]
        alternating = [imagine([(a, b)[i % 2]], cfg.seed + i, cfg.switch_steps)[1] for i in range(rounds)]
        out["switch_same_request_s"], out["switch_alternating_request_s"] = median(same), median(alternating)
        out["switch_latency_difference_ms"] = (median(alternating) - median(same)) * 1e3
        out.setdefault("switch_ms", max(0.0, out["switch_latency_difference_ms"]))
        return out

    def _ours_throughput(self, worker, imagine, member) -> dict:
        from bench.timing import median

        imagine([member[0]])  # the service exists and is warm, as in a running worker
        # The first round loads each LoRA once (cold cache) and runs the forward the compiling process has not made
        # yet; the second finds the LoRAs cached and (settled) the forward compiled.
        rounds = [self._ours_batch_round(worker, member, 0)]
        settled = self._settle(worker, "throughput")
        rounds += [self._ours_batch_round(worker, member, i) for i in range(1, 1 + SETTLED_ROUNDS)]
        compiled = " on the forward compiled ahead of time (settled)" if settled.get("settle_throughput_s") else ""
        deep = (f"; deep cache every {self.cfg.deep_cache} steps (BOOTHBOT_DEEP_CACHE)" if self.cfg.deep_cache > 1
                else "; deep cache off")
        return {**settled, "throughput_round_s": rounds, "throughput_ips": self.cfg.requests / median(rounds[1:]),
                "throughput_mode": f"one run_many request of {self.cfg.requests} /imagine jobs through the worker "
                                   "(Worker.run_many -> GenerationService.imagine_many), as the dispatcher batches "
                                   f"queued jobs{compiled}, the median of {SETTLED_ROUNDS} rounds after the first"
                                   f"{deep}"}

    def _settle(self, worker, label: str) -> dict:
        """As a running bot serves once its first minutes are over: wait for the compiling process to finish the
        forwards the requests so far used (trainer/generation/aot_kernels.py) and let the worker's idle moment adopt
        them. Reports the wait and what serves compiled; nothing where the worker does not compile ahead."""
        generation = worker.worker.generation
        aot = generation.aot if generation is not None else None
        if not self.cfg.settle or aot is None:
            return {}
        started = time.perf_counter()
        for _ in range(3):  # the requests' process; then the one an idle moment starts for shapes noted meanwhile
            aot.wait(SETTLE_TIMEOUT_S)
            aot.loader_ready.wait(SETTLE_TIMEOUT_S)
            worker.worker.idle()
            if not aot.compiling:
                break
        return {f"settle_{label}_s": time.perf_counter() - started,
                f"compiled_{label}": sorted(aot.shapes[name].describe() for name in aot.checked),
                f"not_compiled_{label}": dict(aot.refused)}

    def _ours_batch_round(self, worker, member, round_: int = 0) -> float:
        """Seconds for `requests` jobs of different members (each their own LoRA and folder) as one run_many."""
        from bench.ours import imagine_params

        cfg = self.cfg
        images_dir = self.fx.root / "ours-data" / "images"
        params = [imagine_params([member[i % len(member)]], images_dir / f"batch{round_}-{i}", steps=cfg.imagine_steps,
                                 cfg=CFG_SCALE, size=cfg.resolution, seed=cfg.seed + i) for i in range(cfg.requests)]
        results, seconds = worker.run_many("imagine", params)
        if sum(len(r["images"]) for r in results) != cfg.requests:
            raise RuntimeError(f"the batch made {sum(len(r['images']) for r in results)} images, not {cfg.requests}")
        return seconds

    # --- profile -----------------------------------------------------------------------------------------------
    def profile(self) -> dict:
        from bench.profiling import profile_generation, profile_train_step

        from trainer.models.loading import load_pipeline

        cfg = self.cfg
        # A fresh load, as the worker starts: the baseline without peft layers; the probe then adds adapters the way
        # the generation service's cache does, to show what they cost.
        pipe = load_pipeline(str(self.fx.model_dir), cfg.device)
        out = {"dtype": str(pipe.unet.dtype)}
        out["generation"] = self.attempt("profile generation", profile_generation, pipe, cfg.device, self.fx.loras,
                                         steps=cfg.imagine_steps, size=cfg.resolution, cfg=CFG_SCALE,
                                         repeats=cfg.repeats)
        out["train_step"] = self.attempt("profile train step", profile_train_step, pipe, cfg.device, rank=16,
                                         size=cfg.resolution, batches=(1,) if cfg.tiny else (1, 8),
                                         repeats=cfg.repeats)
        return out

    def run(self) -> None:
        plan = [("reference_train", "reference train", self.reference_training, ("train",)),
                ("reference_serving", "reference imagine", self.reference_serving, ("imagine", "throughput", "switch")),
                ("ours", "ours", self.ours, ("train", "imagine", "throughput", "switch")),
                ("profile", "profile", self.profile, ("profile",))]
        for key, where, fn, sections in plan:
            if self.wants(*sections):
                started = time.perf_counter()
                self.results[key] = self.attempt(where, fn)
                print(f"bench: {where} finished in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
                self.on_section(self)  # partial results survive a run cut short


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def summarise(bench: Bench) -> dict:
    """The comparison metrics (reference vs ours) from the raw results."""
    from bench.report import format_value

    r = bench.results
    ref_train, serving, ours = r.get("reference_train") or {}, r.get("reference_serving") or {}, r.get("ours") or {}
    metrics: dict = {}
    if "reference_train" in r:
        ref_total, ref_class = ref_train.get("total_s"), ref_train.get("class_images_s")
        ref_warm = ref_total - ref_class if ref_total is not None and ref_class is not None else None
        note = (f"both cold (class images made first); with class images already there: reference "
                f"{format_value(ref_warm)} s, ours {format_value(_get(ours, 'train_warm', 'lora_saved_s'))} s; ours job done (4 samples "
                f"too) {format_value(_get(ours, 'train_cold', 'seconds'))} s, {_get(ours, 'train_cold', 'steps')} steps; "
                f"reference = class images {format_value(ref_class)} s + load {format_value(ref_train.get('load_s'))} s + loop "
                f"{format_value(ref_train.get('loop_s'))} s ({format_value(ref_train.get('step_s'))} s/step) + save "
                f"{format_value(ref_train.get('save_s'))} s")
        phases = _get(ours, "train_warm", "timings") or _get(ours, "train_cold", "timings")
        if phases:
            note += (f"; ours {'warm' if _get(ours, 'train_warm', 'timings') else 'cold'} phases: "
                     + ", ".join(f"{k} {format_value(v)} s" for k, v in phases.items())
                     + f" ({_get(ours, 'train_cold', 'graph_steps')} steps replayed from a CUDA graph)")
        if bench.cfg.ours_batch:
            note += (f"; RECIPE CHANGE: ours at batch {bench.cfg.ours_batch} (same samples seen in fewer steps, "
                     "same learning rate), not the documented batch-1 recipe")
        metrics["train_s"] = {"reference": ref_total, "ours": _get(ours, "train_cold", "lora_saved_s"),
                              "note": note}
    if "reference_serving" in r:
        for metric, key in (("imagine_s", "imagine_s"), ("throughput_ips", "throughput_ips")):
            if bench.wants(metric.split("_")[0]):
                metrics[metric] = {"reference": serving.get(key), "ours": ours.get(key),
                                   "note": ""}
        if bench.wants("imagine") and ours.get("settle_imagine_s") is not None:
            metrics["imagine_s"]["note"] = (f"ours on the forwards compiled ahead of time (the first /imagine "
                                            f"{format_value(ours.get('imagine_first_s'))} s ran before them; "
                                            f"compiling them took {format_value(ours['settle_imagine_s'])} s)")
        if bench.wants("throughput") and "throughput_mode" in ours:
            metrics["throughput_ips"]["note"] = ours["throughput_mode"]
        if bench.wants("switch"):
            metrics["switch_ms"] = {
                "reference": serving.get("switch_unload_load_ms"), "ours": ours.get("switch_ms"),
                "note": (f"reference = unload + load_lora_weights; with both kept loaded, "
                         f"set_adapters takes {format_value(serving.get('switch_set_adapters_ms'))} ms; "
                         f"ours = {ours.get('switch_method', 'extra latency of a request whose LoRA differs from the last')}")}
    ref_peaks = [_get(x, "peak_memory", "reserved_gb") for x in (ref_train, serving)]
    if bench.wants("train") and any(p is not None for p in ref_peaks):  # the goal is about training + serving
        metrics["peak_vram_gb"] = {
            "reference": sum(p for p in ref_peaks if p is not None), "ours": _get(ours, "peak_memory", "reserved_gb"),
            "note": "torch allocator reserved peak (CUDA context not included); reference = training process + "
                    "fp16 serving process side by side"}
    return metrics


def build_report(env: dict, cfg: BenchConfig, bench: Bench) -> dict:
    from bench.report import comparison_rows

    metrics = summarise(bench)
    return {"environment": env, "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "metrics": metrics, "rows": comparison_rows(metrics, cfg.family), "results": bench.results, "errors": bench.errors}


def run_bench(cfg: BenchConfig, json_path: Path | None = None) -> dict:
    from bench.report import environment, write_json

    env = environment(cfg.device)
    on_section = (lambda bench: write_json(build_report(env, cfg, bench), json_path)) if json_path else None
    with tempfile.TemporaryDirectory(prefix="boothbot-bench-", dir=cfg.work_dir) as tmp:
        started = time.perf_counter()
        fx = prepare_fixtures(cfg, Path(tmp))
        print(f"bench: model, photos and LoRAs ready in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)
        bench = Bench(cfg, fx, on_section)
        bench.run()
        return build_report(env, cfg, bench)


def _quiet_libraries(debug: bool) -> None:
    # Progress bars and transformers' per-load "LOAD REPORT" tables (base weights absent from a LoRA file, by design)
    # would bury the table; real warnings and errors still show.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.quiet import quiet_libraries

    quiet_libraries(debug)


def run(args: argparse.Namespace) -> int:
    from bench.report import format_table, write_json

    cfg = config_from_args(args)
    _quiet_libraries(args.debug)
    threads = args.threads or (1 if cfg.tiny else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    report = run_bench(cfg, args.json)
    print(format_table(report), flush=True)
    if args.json:
        write_json(report, args.json)
        print(f"results written to {args.json}")
    return 1 if report["errors"] else 0
