"""DreamBooth LoRA training of one concept on the shared, resident pipeline, in resumable slices.

`train_concept(pipe, spec, cache_dir=...)` is what the GPU worker, the CLI and the tests call. One call runs one
slice: it prepares (class images, cached latents and text embeddings), trains until the job is finished,
`should_yield()` turns true (someone waits for the GPU; while class images are made: at the next sampler step,
the batch kept in `live` for the next run; in the setup: once the class images or the inputs are ready) or
the slice's time (an upper bound, off by default) is up (→ "paused", with a checkpoint under out_dir/checkpoint/)
or `should_stop()` turns true (→ "cancelled"), and always leaves the pipeline as it found it (see
trainer/training/lora_scope.py). With `checkpoint_s` it also writes a crash checkpoint that often without stopping
(trainer/training/periodic_checkpoint.py). With `live` (the worker's LiveTrainings) a paused training stays
resident, its adapter off, and the next call for it goes on from memory with the phase it paused in
(trainer/training/live.py). Calling it again
with the same spec resumes from the checkpoint; the result is identical to an uninterrupted run (same hardware, same
seed). A finished training removes its checkpoint and records its result in out_dir/training.json, which answers a
repeated call.

The recipe and where each default comes from: docs/TRAINING.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.contract.errors import UserError
from trainer.contract.files import write_text_atomic
from trainer.contract.naming import class_kind
from trainer.contract.train_spec import TrainSpec
from trainer.training import checkpoint
from trainer.training.periodic_checkpoint import PeriodicCheckpoint
from trainer.training.step import StepRunner

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
# With the default preview interval (a fifth of the steps), a preview after the first is made only once the training
# has run this many times the last preview's own time since it: previews take at most a tenth of a training. A short
# training on a big GPU (12 s of steps, ≈0.5 s a preview on an H200) shows one; a long one on a small card shows all.
PREVIEW_SPACING = 9.0
# A training's phases, in order; `_Slice.phase` is the one it goes on with. A run may pause (yield) inside the class
# images (at a batch of them), after the phases in YIELD_AFTER, and at a step boundary; kept resident (`live`), the
# next run goes on with the phase it stopped in.
PHASES = ("class_images", "inputs", "adapters", "steps")
YIELD_AFTER = ("class_images", "inputs")
INPUTS_FILE = "inputs.safetensors"
FINISHED_FILE = "training.json"  # {"fingerprint", "result"} of the training that finished in this out_dir
FINISHED_KEY = "finished"  # where older versions marked a finished training: in its checkpoint's state


def class_prompt(class_name: str) -> str:
    return f"a photo of {class_name}"


def default_steps(photo_count: int, class_name: str) -> int:
    """100 steps per photo (diffusers' LoRA example: 500 steps for 5 photos), at least 800 for people (faces need
    800–1200: Hugging Face's DreamBooth study), else at least 500; at most 1500 (beyond that LoRAs overfit)."""
    low = 800 if class_kind(class_name) == "person" else 500
    return max(low, min(1500, 100 * photo_count))


# What the default recipe sets and a batch above 1 changes together (`recipe_at_batch`); a job that gives any of them
# trains exactly as given.
BATCH_RECIPE_FIELDS = ("steps", "batch_size", "learning_rate", "text_encoder_learning_rate")


# At a batch above 1 the default recipe sees a third of batch 1's samples, with both learning rates × 3 on top of the
# linear scaling rule (× 12 at batch 4). Over three seeds the quality yardstick read it above batch 1 on every subject
# and a little below all the samples at × 4 (mean identity 0.815 vs 0.850, the class held less well), in a third of
# the steps (docs/TRAINING.md, "Batch size": a recipe change for /train in seconds, issue 15).
BIG_BATCH_SAMPLE_SHARE = 1 / 3
BIG_BATCH_RATE_BOOST = 3


def recipe_at_batch(spec: TrainSpec, batch: int, steps_at_batch_1: int | None = None) -> TrainSpec:
    """`spec`'s recipe (batch 1, `steps_at_batch_1` steps, by default the photos' `default_steps`) at `batch`:
    BIG_BATCH_SAMPLE_SHARE of its samples in steps of `batch`, both learning rates × `batch` × BIG_BATCH_RATE_BOOST.
    The steps are what make a training slow: batch 4 trains 800 batch-1 steps (5 photos of a man) in 67."""
    if batch == 1:
        return spec
    from trainer.training.data import find_photos

    steps = steps_at_batch_1 or default_steps(len(find_photos(spec.photos_dir)), spec.class_name)
    rate = batch * BIG_BATCH_RATE_BOOST
    return replace(spec, batch_size=batch, steps=math.ceil(steps * BIG_BATCH_SAMPLE_SHARE / batch),
                   learning_rate=spec.learning_rate * rate,
                   text_encoder_learning_rate=spec.text_encoder_learning_rate * rate)


@dataclass(frozen=True)
class TrainProgress:
    """What on_progress receives. `stage` is "class_images", "training" or "samples". step, total and eta_s count the
    stage's own work: class images made (of the set) for "class_images", steps otherwise."""

    step: int
    total: int
    eta_s: float | None
    loss: float | None
    preview: str | None = None
    stage: str = "training"
    detail: str = ""


@dataclass(frozen=True)
class TrainOutcome:
    status: str  # "done" | "paused" | "cancelled"
    step: int
    total: int
    result: dict | None = None
    # What this call did (_Slice.run_summary), for the worker's log; None: nothing ran. Not part of the outcome's
    # equality: two calls with the same outcome differ in their timings.
    run: dict | None = field(default=None, compare=False)


@dataclass
class _Job:
    """Everything derived from the spec and the pipeline before training starts."""

    spec: TrainSpec
    photos: list
    resolution: int
    total: int
    prompts: list[str]  # unique prompts: instance prompt(s), then the class prompt when prior preservation is on
    photo_prompt: list[int]  # index into prompts, per photo
    class_set: object | None  # priors.ClassImageSet
    base_model: str
    fingerprint: str

    @property
    def instance_prompt(self) -> str:
        return self.spec.instance_prompt


def _native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _prepare_job(pipe, spec: TrainSpec, cache_dir: Path) -> _Job:
    from trainer.training.priors import ClassImageSet, model_fingerprint
    from trainer.training.data import find_photos, photos_digest

    photos = find_photos(spec.photos_dir)
    resolution = spec.resolution or _native_resolution(pipe)
    multiple = int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % multiple or not multiple <= resolution <= 2048:
        raise UserError(f"Training settings: the resolution must be a multiple of {multiple} up to 2048.")
    total = spec.steps or default_steps(len(photos), spec.class_name)
    base = spec.instance_prompt
    per_photo = [f"{base}, {p.caption}" if p.caption else base for p in photos]
    prompts = list(dict.fromkeys(per_photo))
    photo_prompt = [prompts.index(p) for p in per_photo]
    model_fp = model_fingerprint(pipe)
    class_set = None
    if spec.uses_prior:
        prompts.append(class_prompt(spec.class_name))
        class_set = ClassImageSet.for_model(cache_dir, model_fp, prompts[-1], resolution, spec.class_images,
                                             spec.class_image_steps)
    fingerprint = hashlib.sha256(json.dumps(
        [spec.fingerprint_fields(), photos_digest(photos), model_fp, resolution, total, prompts,
         str(class_set.directory.name) if class_set else None], sort_keys=True, default=str).encode()).hexdigest()
    base_model = spec.base_model or getattr(pipe, "name_or_path", None) or "unknown"
    return _Job(spec, photos, resolution, total, prompts, photo_prompt, class_set, str(base_model), fingerprint)


def train_concept(pipe, spec: TrainSpec, *, cache_dir: Path, on_progress=None, should_stop=None,
                  slice_s: float | None = None, should_yield=None, checkpoint_s: float | None = None,
                  live=None, before_adapters=None) -> TrainOutcome:
    """Run one slice of `spec`'s training on `pipe`; see the module docstring. Raises UserError for bad inputs.
    `before_adapters()` is called once the class images are ready, right before the LoRA adapters are added (the
    worker frees generation's memory there, not before the class images, which do not need it)."""
    started = time.monotonic()
    slice_s = spec.slice_s if slice_s is None else slice_s
    deadline = started + slice_s if slice_s and slice_s > 0 else None
    on_progress = on_progress or (lambda info: None)
    should_stop = should_stop or (lambda: False)
    should_yield = should_yield or (lambda: False)
    spec.validate()
    job = _prepare_job(pipe, spec, Path(cache_dir))
    if live is not None:
        held = live.take(job.fingerprint)
        if held is not None and (Path(held.spec.out_dir) != Path(spec.out_dir) or _written_since(held)):
            # Its files are elsewhere now (a Ray actor gives every request its own directory), or another worker
            # (lane) trained it further after the yield: its file is newer than memory. Go on from the file.
            held.close()
        elif held is not None:
            return held.resume(started, deadline, on_progress, should_stop, should_yield, live)
        live.drop()  # another training's state: this one needs the memory
    finished = _finished_result(spec.out_dir, job.fingerprint)
    if finished is not None:
        checkpoint.remove(spec.out_dir)  # left behind only if the process died right after the record was written
        return TrainOutcome("done", job.total, job.total, finished)
    state = checkpoint.load_state(spec.out_dir, job.fingerprint)
    if state and state.get(FINISHED_KEY):
        state = None  # it holds no weights to resume from: train again
    if should_stop():
        checkpoint.remove(spec.out_dir)
        return TrainOutcome("cancelled", _step_of(state), job.total)
    return _Slice(pipe, job, state, started, deadline, on_progress, should_stop, should_yield,
                  PeriodicCheckpoint(spec.out_dir, checkpoint_s), before_adapters).run(live)


def _written_since(held: "_Slice") -> bool:
    """Whether the checkpoint on disk is no longer the one `held` wrote when it yielded."""
    held.checkpoints.wait()
    return held.checkpoints.last_stamp != checkpoint.stamp(held.spec.out_dir)


def _step_of(state: dict | None) -> int:
    return int(state["step"]) if state else 0


def _outputs_exist(result: dict) -> bool:
    return all(Path(p).is_file() for p in [result["lora"], result["lora_kohya"], *result["samples"]])


def _finished_result(out_dir: Path, fingerprint: str) -> dict | None:
    """The result of this same training when it already finished in out_dir and its files are all still there."""
    try:
        record = json.loads((out_dir / FINISHED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or not _outputs_exist(record["result"]):
        return None
    return record["result"]


def _write_finished(out_dir: Path, fingerprint: str, result: dict) -> None:
    write_text_atomic(out_dir / FINISHED_FILE, json.dumps({"fingerprint": fingerprint, "result": result}, indent=2))


class _Slice:
    def __init__(self, pipe, job: _Job, state, started, deadline, on_progress, should_stop, should_yield,
                 checkpoints: PeriodicCheckpoint, before_adapters=None):
        import torch

        self.pipe, self.job, self.spec, self.state = pipe, job, job.spec, state
        self.started, self.deadline = started, deadline
        self.timings: dict[str, float] = {}  # seconds per phase of this slice (logged, and in the result)
        self.on_progress, self.should_stop, self.should_yield = on_progress, should_stop, should_yield
        self.checkpoints = checkpoints
        self.before_adapters = before_adapters or (lambda: None)
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.step = _step_of(state)
        self.elapsed_before = float(state["elapsed_s"]) if state else 0.0
        self.noise_generator = torch.Generator(device=self.device)
        earlier = job.spec.preview_interval(job.total) and job.spec.preview_file.is_file()
        self.preview: str | None = str(job.spec.preview_file.resolve()) if earlier else None  # an earlier slice's
        self.scope = None  # LoraTrainingScope, open from the first slice until close()
        self.phase = PHASES[0]  # the phase this training goes on with
        self.progressed = False  # whether this call did work a later run does not redo (then it may yield)
        self.class_graphs = None  # the class images' unet_graphs (None off CUDA), held until the set is complete
        self.class_graphs_owner = None  # the ExitStack that frees them
        # The previews' UNet graphs, captured at the first preview and replayed by the next ones until close(): the
        # LoRA they read is trained in place. A capture per preview made each ~1 s (H200, batch 4: 4 s of 29).
        self.preview_graphs = None
        # The samples' graphs (whole forward and deep-cache head), kept while their batch is paused where generation's
        # memory is kept too (a big GPU), so that going on does not capture them again (two captures, ~0.5 s of an
        # H200); freed once the samples are made.
        self.sample_graphs = None
        self.class_latents = None
        self.inputs: dict | None = None
        self.trainer: StepRunner | None = None
        self.training_rng: dict | None = None  # the global RNG states while suspended (live)
        self.saved: tuple | None = None  # (lora, kohya, seconds) once the LoRA files are written
        self.paused_samples = None  # the samples' batch stopped between two sampler steps (images.PausedBatch)
        self.paused_at: int | None = None  # the step whose state the last pause of a resident training wrote
        self.live = None
        self.origin = "file" if state else "start"  # where this call's run went on from: start, file or memory
        self.first_step = self.step  # this call's
        self.steps_s = 0.0  # this call's steps (GPU work included)
        self.setup_s: float | None = None  # this call's time before its first step

    # ---------------------------------------------------------------- orchestration
    def run(self, live=None) -> TrainOutcome:
        from trainer.training.lora_scope import LoraTrainingScope

        self.live = live
        with self._session(self.state["rng"] if self.state and "rng" in self.state else None):
            self.scope = LoraTrainingScope(self.pipe, self.spec.adapter_name).__enter__()
            self.scope.base_model_only()
            return self._leave(self._run_phases)

    def resume(self, started, deadline, on_progress, should_stop, should_yield, live) -> TrainOutcome:
        """Go on from memory after a yield (see trainer/training/live.py) with the phase it stopped in: no checkpoint
        read, no adapters added, the CUDA graphs (class images' or the step's) replayed as captured."""
        from trainer.training.lora_scope import resume

        self.started, self.deadline, self.live = started, deadline, live
        self.on_progress, self.should_stop, self.should_yield = on_progress, should_stop, should_yield
        self.origin, self.first_step, self.steps_s, self.setup_s = "memory", self.step, 0.0, None
        self.progressed = False
        with self._session(self.training_rng):
            resume(self.scope)
            return self._leave(self._run_phases)

    @property
    def class_batches(self):
        """The live trainings' class-image batches paused mid-way (priors.UnfinishedBatches); without `live`, None: no
        pause inside a batch."""
        return None if self.live is None else self.live.class_batches

    def _leave(self, body) -> TrainOutcome:
        """Run `body` in the open scope; then keep the training resident (paused, with a `live` holder) or close."""
        from trainer.training.lora_scope import suspend

        try:
            outcome = body()
        except BaseException:
            self.close()
            raise
        outcome = replace(outcome, run=self.run_summary())
        if outcome.status == "paused" and self.live is not None:
            suspend(self.scope)
            self.training_rng = checkpoint.capture_global_rng()
            self.elapsed_before, self.started = self._elapsed(), time.monotonic()
            self.live.keep(self)
        else:
            self.close()
        return outcome

    @contextmanager
    def _session(self, rng: dict | None):
        """The global RNGs (the training's, else seeded) and deterministic kernels while this training runs; the
        caller's own afterwards."""
        caller_rng = checkpoint.capture_global_rng()
        try:
            if rng is not None:
                checkpoint.restore_global_rng(rng)
            else:
                checkpoint.seed_global_rng(self.spec.seed)
            with _deterministic_kernels(self.spec.deterministic):
                yield
        finally:
            checkpoint.restore_global_rng(caller_rng)

    def close(self) -> None:
        """Free the graphs (class images', previews', samples', step's) and give the pipeline back as it was found
        (ours removed)."""
        from trainer.training.images import free_graphs

        self.checkpoints.wait()
        self._free_class_graphs()
        free_graphs(self.preview_graphs)
        free_graphs(self.sample_graphs)
        self.preview_graphs = self.sample_graphs = None
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        if self.scope is not None:
            scope, self.scope = self.scope, None
            if getattr(scope, "suspended", None):
                from trainer.training.lora_scope import resume

                resume(scope)  # back to the training's flags, which the scope's exit knows how to undo
            scope.__exit__(None, None, None)

    def _run_phases(self) -> TrainOutcome:
        """The phases from the one this training stopped in; pausing inside one, or after one in YIELD_AFTER when
        someone waits and this call already did lasting work (so a busy queue cannot starve a training)."""
        for phase in PHASES[PHASES.index(self.phase):]:
            self.phase = phase
            if phase == "steps":
                return self._train_and_end()
            with self._phase(phase):
                status = getattr(self, f"_{phase}_phase")()
            if status != "complete":
                return self._stop(status, self.trainer)
            if phase in YIELD_AFTER and self.progressed and self.should_yield():
                self.phase = PHASES[PHASES.index(phase) + 1]
                return self._stop("paused", self.trainer)
        raise AssertionError("unreachable: the steps phase ends every run")

    def _class_images_phase(self) -> str:
        if self.job.class_set is None:
            return "complete"
        status = self._ensure_class_images()
        if status == "complete":
            self._free_class_graphs()
            self.class_latents = self.job.class_set.latents()
        return status

    def _inputs_phase(self) -> str:
        self.inputs = self._inputs()
        return "complete"

    def _adapters_phase(self) -> str:
        scope = self.scope
        self.before_adapters()
        scope.add_adapters(self.spec.rank, self.spec.train_text_encoder, seed=self.spec.seed)
        if self.spec.gradient_checkpointing:
            scope.enable_gradient_checkpointing()
        self.trainer = StepRunner(self.pipe, self.job, self.inputs, self.class_latents, self.noise_generator,
                                  cuda_graphs=self.spec.cuda_graphs)
        self.inputs = self.class_latents = None  # the StepRunner holds them now
        if self.state and "lora" in self.state:
            self.trainer.load_state(self.state)
        else:
            self.noise_generator.manual_seed(self.spec.seed + 1)
        return "complete"

    def _train_and_end(self) -> TrainOutcome:
        began = time.monotonic()
        self.setup_s = began - self.started
        with self._phase("steps", sync=True):
            status = self._train(self.trainer)
        self.steps_s = time.monotonic() - began
        if status != "done":
            return self._stop(status, self.trainer)
        return self._finish(self.scope, self.trainer)

    def run_summary(self) -> dict:
        """This call's run: where it went on from, at which step, its setup (class images, inputs, adapters, or
        nothing when resumed from memory), its steps, and the phase it ended in (`phase`, `phase_detail`: for the
        class images, how many of the set exist)."""
        setup_s = self.setup_s if self.setup_s is not None else time.monotonic() - self.started
        summary = {"from": self.origin, "first_step": self.first_step, "setup_s": round(setup_s, 3),
                   "steps": self.step - self.first_step, "steps_s": round(self.steps_s, 3), "phase": self.phase}
        class_set = self.job.class_set
        if self.phase == "class_images" and class_set is not None:
            summary["phase_detail"] = f"{class_set.count - len(class_set.missing())}/{class_set.count}"
            paused_at = self.class_batches and self.class_batches.step(class_set.directory)
            if paused_at:
                summary["phase_detail"] += f", the next batch at sampler step {paused_at}"
            elif not class_set.missing():
                summary["phase_detail"] += f", their latents {class_set.latents_encoded()}"
        if self.paused_samples is not None:
            summary["phase_detail"] = (f"in the samples, the next at sampler step {self.paused_samples.steps_done}/"
                                       f"{self.paused_samples.steps}")
        return summary

    def _free_class_graphs(self) -> None:
        if self.class_graphs_owner is not None:
            owner, self.class_graphs_owner, self.class_graphs = self.class_graphs_owner, None, None
            owner.close()

    def _ensure_class_images(self) -> str:
        """Make the missing class images. The UNet graphs they replay are this training's, kept while it is held
        between runs (not captured again when it resumes from memory) and freed once the set is complete."""
        from contextlib import ExitStack

        from trainer.training.images import unet_graphs

        class_set = self.job.class_set
        if class_set.complete:
            return "complete"
        self.progressed = True  # at least one batch is made (ClassImageSet.ensure), or the set is finished
        if self.class_graphs_owner is None:
            self.class_graphs_owner = ExitStack()
            self.class_graphs = self.class_graphs_owner.enter_context(unet_graphs(self.pipe))
        began, done_before = time.monotonic(), class_set.count - len(class_set.missing())  # earlier slices' images

        def report(done: int, count: int) -> None:
            made = done - done_before
            eta_s = (time.monotonic() - began) / made * (count - done) if made else None
            self.on_progress(TrainProgress(done, count, eta_s, None, self.preview, "class_images",
                                           f"making class images {done}/{count}"))

        report(done_before, class_set.count)
        # 8 images = 16 UNet rows with guidance: the GPU stays busy. SDXL: 4, as its images have 4× the pixels of
        # SD 1.x's (and a 24 GB card also holds the 7 GB model).
        from trainer.models.family import family_of

        wide = 4 if family_of(self.pipe).extra_conditioning else 8
        batch = wide if self.device.type == "cuda" else 2
        return class_set.ensure(self.pipe, batch_size=batch, deadline=self.deadline, should_stop=self.should_stop,
                                should_yield=self.should_yield, on_image=report, graphs=self.class_graphs,
                                unfinished=self.class_batches)

    def _inputs(self) -> dict:
        """Latents of the photos (and mirrors), prompt token ids and, unless the text encoder trains, embeddings;
        for SDXL the second encoder's ids, the pooled embeddings and each photo's size conditioning too.

        Computed on the first slice and kept in out_dir/checkpoint/inputs.safetensors for the others, so each job
        runs the VAE and the text encoder over its inputs once.
        """
        from safetensors.torch import load_file

        from trainer.training.lora_files import save_file_atomic
        from trainer.training.data import encode_latents, load_pixels

        path = checkpoint.checkpoint_dir(self.spec.out_dir) / INPUTS_FILE
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                same_job = (f.metadata() or {}).get("fingerprint") == self.job.fingerprint
            if same_job:
                return load_file(str(path))
        self.progressed = True
        import torch

        from trainer.models.family import encode_prompt_ids, family_of, tokenize, vae_precision

        family = family_of(self.pipe)
        paths = [p.path for p in self.job.photos]
        pixels = load_pixels(paths, self.job.resolution)
        with vae_precision(self.pipe) as vae:
            mean, std = encode_latents(vae, pixels)
        ids = tokenize(self.pipe, family, self.job.prompts)
        inputs = {"mean": mean, "std": std, "prompt_ids": ids[0],
                  "photo_prompt": torch.tensor(self.job.photo_prompt, dtype=torch.long)}
        if family.extra_conditioning:
            from trainer.training.data import size_conditioning

            inputs["prompt_ids_2"] = ids[1]
            inputs["time_ids"] = size_conditioning(paths, self.job.resolution)
        if not self.spec.train_text_encoder:
            embeds, pooled = encode_prompt_ids(self.pipe, family, ids)
            inputs["embeds"] = embeds.float().cpu()
            if pooled is not None:
                inputs["pooled"] = pooled.float().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file_atomic(inputs, path, {"fingerprint": self.job.fingerprint})
        return inputs

    # ---------------------------------------------------------------- the loop
    def _train(self, trainer: "StepRunner") -> str:
        total = self.job.total
        first_step, loop_start = self.step, time.monotonic()
        last_report = loop_start
        every = self.spec.preview_interval(total)
        spaced = self.spec.preview_every is None  # an interval given explicitly is kept exactly
        next_preview_at = -math.inf  # spaced: the last preview's end + PREVIEW_SPACING × its own time (this slice)
        new_preview = False
        while self.step < total:
            if self.should_stop():
                return "cancelled"
            if self.step > first_step and (self.should_yield() or (
                    self.deadline is not None and time.monotonic() >= self.deadline)):
                return "paused"
            trainer.step(self.step)
            self.step += 1
            if self.checkpoints.due() and self.step < total:
                self.checkpoints.save_async(self._state(trainer, on_device=True))
            # Not when someone already waits: a preview's first sampler step (and, the first time, its graph's
            # capture: ~0.5 s on an H200) would come before their pause; they get the next preview.
            if (every and self.step % every == 0 and self.step < total and not self.should_yield()
                    and time.monotonic() >= next_preview_at):
                began = time.monotonic()
                preview = self._preview()
                if spaced:
                    ended = time.monotonic()
                    next_preview_at = ended + PREVIEW_SPACING * (ended - began)
                if preview is not None:
                    self.preview, new_preview = preview, True
            now = time.monotonic()
            if self.step in (first_step + 1, total) or new_preview or now - last_report >= PROGRESS_EVERY_S:
                loss = trainer.take_mean_loss()  # the only host sync in the loop
                now = time.monotonic()
                rate = (now - loop_start) / (self.step - first_step)
                self._report(loss=loss, eta_s=rate * (total - self.step))
                last_report, new_preview = now, False
        return "done"

    def _preview(self) -> str | None:
        """The instance prompt's picture with the LoRA so far (at 512² on an H200 ≈0.5 s, the first ≈1 s with its
        graph's capture: session 13's serving run D). None when someone started waiting for the GPU (or a cancel
        came) meanwhile: the picture is dropped between two sampler steps rather than make them wait for it; the
        member gets the next one."""
        from trainer.training.images import PausedBatch, generate_pausable, new_unet_graphs, save_image_atomic

        if self.preview_graphs is None:
            self.preview_graphs = new_unet_graphs(self.pipe)
        images = generate_pausable(self.pipe, self.job.instance_prompt, [self.spec.seed], self.job.resolution,
                                   steps=20, graphs=self.preview_graphs,
                                   should_pause=lambda: self.should_yield() or self.should_stop())
        if isinstance(images, PausedBatch):
            return None
        return str(save_image_atomic(images[0], self.spec.preview_file, quality=85).resolve())

    @contextmanager
    def _phase(self, name: str, *, sync: bool = False):
        began = time.monotonic()
        try:
            yield
        finally:
            if sync and self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)  # the queued GPU work belongs to this phase
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - began, 3)

    def _report(self, *, loss=None, eta_s=None, stage="training", detail="") -> None:
        # `preview` is the latest preview of this slice in every event after it, so a throttled receiver that drops
        # the event right after a preview still gets it with the next one.
        self.on_progress(TrainProgress(self.step, self.job.total, eta_s, loss, self.preview, stage, detail))

    # ---------------------------------------------------------------- endings
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.started)

    def _state(self, trainer, *, on_device: bool = False) -> dict:
        state = {"fingerprint": self.job.fingerprint, "step": self.step, "elapsed_s": self._elapsed(),
                 "rng": checkpoint.capture_global_rng()}
        if trainer is not None:
            state.update(trainer.state_dict(on_device=on_device))
        return state

    def _stop(self, status: str, trainer) -> TrainOutcome:
        if status == "cancelled":
            self.checkpoints.wait()  # a periodic write in flight must not land after the removal
            checkpoint.remove(self.spec.out_dir)
            return TrainOutcome("cancelled", self.step, self.job.total)
        if self.live is not None:
            # Kept resident: the file is for a crash or a drop; written by `checkpoints` (queued behind a periodic
            # write in flight, not waiting for it: someone waits for the GPU), so that a held training knows whether
            # the file is still its own (_written_since). Not again for a pause in the samples when the last pause
            # wrote this step's state: the LoRA is final and written, the state the same (tens of MB for nothing).
            again = self.paused_samples is not None and self.paused_at == self.step and not self.checkpoints.failed
            if not again:
                self.checkpoints.save_async(self._state(trainer, on_device=True))
                self.paused_at = self.step
        else:
            self.checkpoints.wait()  # an older periodic write must not land after this
            checkpoint.save_state(self.spec.out_dir, self._state(trainer))
        return TrainOutcome("paused", self.step, self.job.total)

    def _finish(self, scope, trainer: "StepRunner") -> TrainOutcome:
        from trainer.training.images import free_graphs

        spec, job = self.spec, self.job
        # The training's time, every slice until its LoRA is written, measured once for the LoRA's metadata, the result
        # and the CLI's "trained in"; the samples come after (their time is in timings).
        if self.saved is None:
            seconds = round(self._elapsed(), 1)
            with self._phase("save"):
                self.saved = (*self._save_lora(scope, seconds), seconds)
        lora, kohya, seconds = self.saved
        free_graphs(self.preview_graphs)  # the last step is made: no preview follows, and the samples need the memory
        self.preview_graphs = None
        with self._phase("samples"):
            samples = self._samples(lora)
        if samples is None:  # someone waits for the GPU: the samples go on from memory at the next run
            return self._stop("paused", trainer)
        result = {"lora": str(lora.resolve()), "lora_kohya": str(kohya.resolve()), "samples": samples,
                  "steps": job.total, "seconds": seconds, "timings": dict(self.timings),
                  "graph_steps": trainer.graph_replays}
        log.info("training %s done: %d steps in %.1f s (this slice: %s; %d steps replayed from a CUDA graph)",
                 spec.concept_id, job.total, result["seconds"], self.timings, trainer.graph_replays)
        _write_finished(spec.out_dir, job.fingerprint, result)
        self.checkpoints.wait()
        checkpoint.remove(spec.out_dir)  # only resuming needed it
        return TrainOutcome("done", job.total, job.total, result)

    def _save_lora(self, scope, seconds: float):
        """Write both LoRA files (diffusers and kohya format) with the training's metadata; returns their paths."""
        from peft.utils import get_peft_model_state_dict

        from trainer.models.family import family_of
        from trainer.training.lora_files import training_metadata, write_lora_files

        spec, job = self.spec, self.job
        unet_state = {k: v.detach().float().cpu() for k, v in
                      get_peft_model_state_dict(self.pipe.unet, adapter_name=spec.adapter_name).items()}
        family = family_of(self.pipe)
        te_states = {}
        if spec.train_text_encoder:
            te_states = {name: {k: v.detach().float().cpu() for k, v in
                                get_peft_model_state_dict(encoder, adapter_name=spec.adapter_name).items()}
                         for name, encoder in zip(family.text_encoders, family.text_encoder_modules(self.pipe))}
        # The spec's fields marked `lora`, with the values this training actually used where they are derived.
        metadata = training_metadata(**{
            **spec.lora_fields(), "style": spec.is_style, "steps": job.total, "resolution": job.resolution,
            "prior_preservation": spec.uses_prior, "class_images": spec.class_images if spec.uses_prior else None,
            "text_encoder_learning_rate": spec.text_encoder_learning_rate if spec.train_text_encoder else None,
            "instance_prompt": job.instance_prompt, "base_model": job.base_model, "photo_count": len(job.photos),
            "seconds": seconds})
        return write_lora_files(spec.out_dir, family=family, unet_state=unet_state, text_encoder_states=te_states,
                                unet_config=scope.adapter_config("unet"),
                                text_encoder_configs={name: scope.adapter_config(name) for name in te_states},
                                metadata=metadata, unet_layers_per_block=self.pipe.unet.config.layers_per_block)

    def _samples(self, lora: Path) -> list[str] | None:
        """samples/NNN.png, each with the A1111 `parameters` chunk an /imagine image of the same prompt would carry.
        None when someone started waiting for the GPU: the batch stopped between two sampler steps (each run makes at
        least one), and is kept for the next run of this resident training."""
        from trainer.generation.pnginfo import format_parameters, save_png
        from trainer.training.images import PausedBatch, free_graphs, generate_pausable, new_unet_graphs
        from trainer.training.memory import keeps_generation_memory

        count = self.spec.sample_count
        if not count:
            return []
        self._report(stage="samples", detail=f"making {count} sample image{'' if count == 1 else 's'}")
        seeds = [self.spec.seed + i for i in range(count)]
        # Only a resident training can go on with a paused batch; one resumed from its file makes them again.
        should_pause = self.should_yield if self.live is not None else None
        if self.sample_graphs is None:
            self.sample_graphs = new_unet_graphs(self.pipe)
        images = generate_pausable(self.pipe, self.job.instance_prompt, seeds, self.job.resolution,
                                   graphs=self.sample_graphs, should_pause=should_pause, paused=self.paused_samples,
                                   deep_cache_every=self.spec.sample_deep_cache)
        if isinstance(images, PausedBatch):
            self.paused_samples = images
            if not keeps_generation_memory(self.pipe):  # the waiting /imagine needs the memory for its own graphs
                free_graphs(self.sample_graphs)
                self.sample_graphs = None
            return None
        self.paused_samples = None
        free_graphs(self.sample_graphs)
        self.sample_graphs = None
        prompt, fields = f"{self.job.instance_prompt} <lora:{self.spec.token}:1>", self._sample_fields(lora)
        directory = self.spec.out_dir / "samples"
        return [str(save_png(image, directory / f"{i:03d}.png",
                             format_parameters(prompt, "", {**fields, "Seed": seed})).resolve())
                for i, (image, seed) in enumerate(zip(images, seeds))]

    def _sample_fields(self, lora: Path) -> dict:
        """The A1111 fields of the samples (seed aside), in the order /imagine writes them (generation.py)."""
        from trainer.generation.deep_cache import effective_every
        from trainer.generation.pnginfo import lora_hash, lora_hashes_field, model_label
        from trainer.training.images import GUIDANCE_SCALE, SAMPLER_LABEL, SAMPLER_STEPS

        size = self.job.resolution
        every = effective_every(self.pipe.unet, self.spec.sample_deep_cache)
        return {"Steps": SAMPLER_STEPS, "Sampler": SAMPLER_LABEL, "CFG scale": f"{GUIDANCE_SCALE:g}", "Seed": None,
                "Size": f"{size}x{size}", "Model": model_label(self.job.base_model),
                "Deep cache": f"every {every} steps" if every > 1 else None,
                "Lora hashes": lora_hashes_field([(self.spec.token, lora_hash(lora))])}


@contextmanager
def _deterministic_kernels(enabled: bool):
    """torch.use_deterministic_algorithms + cuDNN's deterministic mode for the duration of a slice, then the
    caller's settings again (the worker's generation may prefer the fastest kernels).

    Not warn_only: in that mode torch keeps cuDNN attention's non-deterministic backward (measured on an H200: two
    identical runs then differ by 5e-5). Every op of an SD 1.x LoRA step has a deterministic kernel (checked with
    the full SD 1.5 architecture, UNet + text encoder, batch 1 and 4), so nothing raises."""
    import torch

    if not enabled:
        yield
        return
    # cuBLAS is reproducible on one stream; torch still refuses (here: warns) unless this is set. It only matters
    # for handles created afterwards, which is why the worker may set it at start too.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
