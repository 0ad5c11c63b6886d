"""A training that yields before its steps (while its class images are made, even between two sampler steps of a
batch, or right after them or after its inputs) stays resident like one that yields during its steps: the next run
goes on with the phase it stopped in, from memory, with the scope, class-image graphs and batch it holds, to exactly
the class images and LoRA of an uninterrupted run."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from tests.trainer.test_training_yield import FROM_FILE, _imagine, _pixels, _same_lora
from tests.trainer.training_helpers import CLASS_STEPS, make_spec, pipeline_state, write_noise_photos
from trainer.generation.fast_unet import UNetGraphs
from trainer.generation.service import GenerationService
from trainer.training import images
from trainer.training.engine import train_concept
from trainer.training.images import SAMPLER_STEPS
from trainer.training.live import LiveTrainings
from trainer.worker import describe_run

FIVE_CLASS_IMAGES = dict(FROM_FILE, class_images=5)  # on CPU two a batch: batches of 2, 2 and 1


def _always() -> bool:
    return True


def _count_class_graphs(monkeypatch) -> list:
    """Every `unet_graphs()` a training opens for its class images, appended when opened. Made on CPU too (where
    they capture nothing: the UNet runs eagerly for CPU tensors), so that what is made and kept can be seen."""
    monkeypatch.setattr(UNetGraphs, "usable", staticmethod(lambda unet: True))
    opened, real = [], images.unet_graphs

    @contextmanager
    def counted(pipe):
        with real(pipe) as graphs:
            opened.append(graphs)
            yield graphs

    monkeypatch.setattr(images, "unet_graphs", counted)
    return opened


def _on_ask(n: int):
    """A `should_yield` that says yes the n-th time it is asked (the class images ask after every sampler step)."""
    asked = []

    def should_yield() -> bool:
        asked.append(True)
        return len(asked) == n
    return should_yield


def _after_the_class_images():
    """A `should_yield` that says no while the two class images are made (one batch on CPU: asked after each of its
    sampler steps) and yes from then on."""
    asked = []

    def should_yield() -> bool:
        asked.append(True)
        return len(asked) > CLASS_STEPS
    return should_yield


def _class_image_pixels(cache) -> list[np.ndarray]:
    return [_pixels(p) for p in sorted(cache.glob("priors/*/*.png"))]


def test_a_training_yielding_in_its_class_images_goes_on_from_memory_with_what_it_holds(tiny_pipeline, tmp_path,
                                                                                        monkeypatch):
    photos = write_noise_photos(tmp_path / "photos", 3)
    service = GenerationService(tiny_pipeline, model_name="tiny")
    untouched = _imagine(service, tmp_path / "before")
    before = pipeline_state(tiny_pipeline)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **FIVE_CLASS_IMAGES),
                          cache_dir=tmp_path / "c1")
    opened = _count_class_graphs(monkeypatch)

    live, cache = LiveTrainings(), tmp_path / "c2"
    spec = make_spec(photos, tmp_path / "yielded", **FIVE_CLASS_IMAGES)
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=_on_ask(CLASS_STEPS + 4))
    assert (paused.status, paused.step, paused.run.get("phase"), paused.run.get("phase_detail")) == (
        "paused", 0, "class_images", f"2/5, the next batch at sampler step 3/{CLASS_STEPS}")
    assert describe_run(paused).endswith(
        f"paused in class images 2/5, the next batch at sampler step 3/{CLASS_STEPS}")
    held = live.held
    assert held is not None  # resident: the scope, the class images' graphs and the batch in progress kept
    scope = held.scope

    between = _imagine(service, tmp_path / "between")
    assert len(between) == len(untouched) and all(np.array_equal(a, b) for a, b in zip(between, untouched))

    again = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=_always)
    assert (again.status, again.run["from"], again.run.get("phase_detail")) == (
        "paused", "memory", f"2/5, the next batch at sampler step 4/{CLASS_STEPS}")  # one step on: none made twice
    assert live.held is held and held.scope is scope  # not rebuilt

    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live)
    assert (done.status, done.run["from"], live.resumed, live.held) == ("done", "memory", 2, None)
    assert len(opened) == 1 and opened[0] is not None  # made once for the three runs, not once a run
    made, uninterrupted = _class_image_pixels(cache), _class_image_pixels(tmp_path / "c1")
    assert len(made) == 5 and all(np.array_equal(a, b) for a, b in zip(made, uninterrupted))
    _same_lora(whole.result["lora"], done.result["lora"])
    assert pipeline_state(tiny_pipeline) == before


def test_a_training_held_in_its_class_images_dropped_leaves_the_pipeline_as_found_and_finishes_from_its_file(
        tiny_pipeline, tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 3)
    before = pipeline_state(tiny_pipeline)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **FIVE_CLASS_IMAGES),
                          cache_dir=tmp_path / "c1")
    live, cache = LiveTrainings(), tmp_path / "c2"
    spec = make_spec(photos, tmp_path / "dropped", **FIVE_CLASS_IMAGES)
    paused = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=_always)
    assert (paused.status, paused.run.get("phase")) == ("paused", "class_images")
    held = live.held
    assert held is not None

    live.drop()  # e.g. another training needs the memory
    assert pipeline_state(tiny_pipeline) == before
    assert (held.scope, held.class_graphs_owner) == (None, None)  # scope closed, graphs freed
    assert live.class_batches.step(held.job.class_set.directory) == f"1/{CLASS_STEPS}"  # its batch outlives it

    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live)
    assert (done.status, done.run["from"], live.resumed) == ("done", "file", 0)
    assert live.class_batches.step(held.job.class_set.directory) is None  # gone on with, from its step 1
    made, uninterrupted = _class_image_pixels(cache), _class_image_pixels(tmp_path / "c1")
    assert len(made) == 5 and all(np.array_equal(a, b) for a, b in zip(made, uninterrupted))
    _same_lora(whole.result["lora"], done.result["lora"])


def test_a_yield_right_after_the_class_images_or_the_inputs_pauses_there_and_goes_on_from_memory(tiny_pipeline,
                                                                                                tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 3)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **FROM_FILE), cache_dir=tmp_path / "c1")
    live, cache = LiveTrainings(), tmp_path / "c2"
    spec = make_spec(photos, tmp_path / "yielded", **FROM_FILE)  # two class images: one batch on CPU

    runs = [train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=answer)
            for answer in (_after_the_class_images(), _always, _always)]
    assert [(r.status, r.step, r.run["from"], r.run.get("phase")) for r in runs] == [
        ("paused", 0, "start", "inputs"),  # the class images (and their latents) are made
        ("paused", 0, "memory", "adapters"),  # the inputs are cached
        ("paused", 1, "memory", "steps")]  # at least one step
    assert [describe_run(r).rsplit("; ", 1)[1] for r in runs] == [
        "paused after the class images", "paused after the inputs", "paused at step 1/5"]

    done = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live)
    assert (done.status, done.run["from"], live.resumed) == ("done", "memory", 3)
    _same_lora(whole.result["lora"], done.result["lora"])


def test_a_run_that_finds_its_setup_done_on_disk_makes_a_step_before_it_yields(tiny_pipeline, tmp_path):
    """Yields in the setup only follow lasting work (class images made, inputs written): a run resumed from the
    file whose class images and inputs are on disk trains at least one step, so a busy queue cannot starve it."""
    photos = write_noise_photos(tmp_path / "photos", 3)
    live, cache = LiveTrainings(), tmp_path / "cache"
    spec = make_spec(photos, tmp_path / "out", **FROM_FILE)
    phases = []
    for answer in (_after_the_class_images(), _always, _always):
        outcome = train_concept(tiny_pipeline, spec, cache_dir=cache, live=live, should_yield=answer)
        phases.append((outcome.step, outcome.run["from"], outcome.run.get("phase")))
        live.drop()  # e.g. the GPU went idle: the next run starts from the file
    assert phases == [(0, "start", "inputs"), (0, "file", "adapters"), (1, "file", "steps")]


SAMPLES = dict(steps=3, sample_count=2, class_images=2)


def _paused_in_the_samples(pipe, tmp_path):
    """(an uninterrupted training's outcome, the same training's spec, its outcome asked to yield once it reported
    its samples, the LiveTrainings holding it)."""
    photos = write_noise_photos(tmp_path / "photos", 3)
    whole = train_concept(pipe, make_spec(photos, tmp_path / "whole", **SAMPLES), cache_dir=tmp_path / "c")
    live, spec, stages = LiveTrainings(), make_spec(photos, tmp_path / "yielded", **SAMPLES), []
    paused = train_concept(pipe, spec, cache_dir=tmp_path / "c", live=live,
                           on_progress=lambda progress: stages.append(progress.stage),
                           should_yield=lambda: "samples" in stages)
    return whole, spec, paused, live


def _same_result(whole, done) -> None:
    _same_lora(whole.result["lora"], done.result["lora"])
    assert [_pixels(p).tolist() for p in done.result["samples"]] == [_pixels(p).tolist() for p in whole.result["samples"]]


def test_a_training_asked_to_yield_in_its_samples_goes_on_from_memory_to_the_same_samples(tiny_pipeline, tmp_path):
    """The samples made after the LoRA is written (4 at 25 sampler steps: ~2.5 s of an H200) did not yield, and an
    /imagine sent then waited 3.0 s (docs/BENCHMARKS.md). Now they stop between two sampler steps when someone waits;
    the next run goes on from memory with that batch, without writing the LoRA again, to the samples and LoRA of an
    uninterrupted run."""
    whole, spec, paused, live = _paused_in_the_samples(tiny_pipeline, tmp_path)
    detail = f"in the samples, the next at sampler step 1/{SAMPLER_STEPS}"
    assert (paused.status, paused.step, paused.total, paused.run.get("phase_detail")) == ("paused", 3, 3, detail)
    assert describe_run(paused).endswith(f"paused at step 3/3, {detail}")
    assert live.held is not None and not (spec.out_dir / "samples").exists()
    lora = spec.out_dir / "lora.safetensors"
    written = lora.stat().st_mtime_ns

    done = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "c", live=live)
    assert (done.status, done.run["from"], live.held) == ("done", "memory", None)
    assert lora.stat().st_mtime_ns == written
    _same_result(whole, done)


def test_a_training_paused_again_and_again_in_its_samples_writes_its_checkpoint_once(tiny_pipeline, tmp_path):
    """Each pause of a resident training writes its state for a crash; in the samples no step is made between two
    pauses, so the state is the same and is written once (LoRA and optimiser: tens of MB a pause). Dropped after
    the last pause, it goes on from that one file to the uninterrupted samples."""
    photos = write_noise_photos(tmp_path / "photos", 3)
    whole = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "whole", **SAMPLES), cache_dir=tmp_path / "c")
    live, spec, stages, written = LiveTrainings(), make_spec(photos, tmp_path / "yielded", **SAMPLES), [], []
    for _ in range(4):
        paused = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "c", live=live,
                               on_progress=lambda progress: stages.append(progress.stage),
                               should_yield=lambda: "samples" in stages)
        assert (paused.status, paused.step) == ("paused", 3)
        live.held.checkpoints.wait()
        written.append(live.held.checkpoints.written)
    assert written == [written[0]] * 4 and written[0] >= 1
    live.drop()
    done = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "c", live=live)
    assert (done.status, done.run["from"]) == ("done", "file")
    _same_result(whole, done)


def test_a_training_paused_in_its_samples_and_dropped_makes_them_again_from_its_file(tiny_pipeline, tmp_path):
    whole, spec, paused, live = _paused_in_the_samples(tiny_pipeline, tmp_path)
    assert (paused.status, paused.step) == ("paused", 3)
    live.drop()  # another training needed the memory, or the GPU went idle
    done = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "c", live=live)
    assert (done.status, done.run["from"]) == ("done", "file")
    _same_result(whole, done)
