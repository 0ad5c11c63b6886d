"""The training engine end to end on the tiny random pipeline (CPU): output files, pipeline hygiene, class-image
cache, cancellation, user errors. Resume is in test_training_resume.py, learning in test_training_learning.py."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.trainer.training_helpers import (
    generate_latents, make_spec, pipeline_state, write_noise_photos, write_solid_photos,
)
from trainer.training import checkpoint
from trainer.contract.errors import UserError
from trainer.training.lora_files import read_metadata
from trainer.generation.pnginfo import lora_hash, parse_parameters, read_png_parameters
from trainer.training.engine import TrainSpec, default_steps, train_concept

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture
def photos(tmp_path):
    return write_noise_photos(tmp_path / "photos", 3)


def test_end_to_end_outputs_load_in_diffusers_and_kohya_format(tiny_pipeline, tiny_model_dir, photos, tmp_path):
    events = []
    spec = make_spec(photos, tmp_path / "out", steps=3)
    outcome = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", on_progress=events.append)

    assert (outcome.status, outcome.step, outcome.total) == ("done", 3, 3)
    result = outcome.result
    assert set(result) == {"lora", "lora_kohya", "samples", "steps", "seconds", "timings", "graph_steps"}
    assert result["steps"] == 3 and result["seconds"] > 0
    assert set(result["timings"]) == {"class_images", "inputs", "adapters", "steps", "save", "samples"}
    assert all(seconds >= 0 for seconds in result["timings"].values())
    assert result["graph_steps"] == 0  # CUDA graphs only on a GPU
    steps = [e.step for e in events if e.stage == "training"]  # throttled to about one a second
    assert steps[0] == 1 and steps[-1] == 3 and steps == sorted(set(steps))
    assert all(e.loss is not None and e.loss > 0 for e in events if e.stage == "training")
    assert events[-1].stage == "samples"

    # The sample carries the A1111 parameters an /imagine image of its prompt would.
    info = parse_parameters(read_png_parameters(result["samples"][0]))
    assert info == {"Prompt": "a photo of squidarth man <lora:squidarth:1>", "Negative prompt": "", "Steps": "20",
                    "Sampler": "DPM++ 2M", "CFG scale": "7.5", "Seed": "7", "Size": "32x32",
                    "Model": tiny_model_dir.name, "Deep cache": "every 3 steps",
                    "Lora hashes": f"squidarth: {lora_hash(result['lora'])}"}

    # Metadata in both headers.
    for path in (result["lora"], result["lora_kohya"]):
        meta = read_metadata(path)
        assert meta["boothbot.token"] == "squidarth" and meta["boothbot.class_name"] == "man"
        assert meta["boothbot.base_model"] == str(tiny_model_dir)
        assert meta["boothbot.steps"] == "3" and meta["boothbot.rank"] == "4"
        assert float(meta["boothbot.learning_rate"]) == spec.learning_rate
        assert meta["boothbot.photo_count"] == "3" and float(meta["boothbot.seconds"]) == result["seconds"]
    assert read_metadata(result["lora_kohya"])["ss_network_dim"] == "4"

    # diffusers format: UNet and text-encoder LoRA, CLIP keys in their portable `text_model.` form.
    diffusers_keys = list(load_file(result["lora"]))
    assert any(k.startswith("unet.") and k.endswith("to_q.lora.down.weight") for k in diffusers_keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in diffusers_keys)

    # kohya format: every module has down, up and alpha (= rank); UNet names and SD 1.x text-encoder names.
    kohya = load_file(result["lora_kohya"])
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:5]
    modules = {k.split(".")[0] for k in kohya}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(kohya)
        assert kohya[f"{module}.alpha"].item() == 4 and kohya[f"{module}.lora_down.weight"].shape[0] == 4
    attention_projections = sum(1 for n, _ in tiny_pipeline.unet.named_modules()
                                if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n))
    assert sum(m.startswith("lora_unet_") for m in modules) == attention_projections
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules

    # diffusers loads it, and the loaded LoRA reproduces the sample made with the trained adapter, pixel for pixel
    # (with the samples' deep cache, as /imagine makes them).
    from trainer.models.loading import load_pipeline
    from trainer.training.images import generate

    fresh = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    fresh.load_lora_weights(result["lora"], adapter_name="trained")
    assert fresh.get_list_adapters() == {"unet": ["trained"], "text_encoder": ["trained"]}
    again = generate(fresh, "a photo of squidarth man", [spec.seed], 32, deep_cache_every=spec.sample_deep_cache)[0]
    sample = Image.open(result["samples"][0])
    assert np.abs(np.asarray(again, np.int16) - np.asarray(sample, np.int16)).max() <= 1


def test_channels_last_unet_trains_in_the_default_layout_and_is_given_back(tiny_pipeline, photos, tmp_path):
    pipe = tiny_pipeline
    pipe.unet.to(memory_format=torch.channels_last)  # as the generation service leaves it on a GPU
    try:
        before = pipeline_state(pipe)
        assert any(before["unet_channels_last"])
        seen = []
        original = pipe.unet.forward

        def forward(*args, **kwargs):
            seen.append(pipe.unet.conv_in.weight.is_contiguous())
            return original(*args, **kwargs)

        pipe.unet.forward = forward
        try:
            spec = make_spec(photos, tmp_path / "out", steps=2, prior_preservation=False, sample_count=0)
            assert train_concept(pipe, spec, cache_dir=tmp_path / "cache").status == "done"
        finally:
            del pipe.unet.forward
        assert seen and all(seen)
        assert pipeline_state(pipe) == before
    finally:
        pipe.unet.to(memory_format=torch.contiguous_format)


def test_pipeline_is_left_as_found_after_paused_cancelled_done_and_error(tiny_pipeline, photos, tmp_path):
    pipe = tiny_pipeline
    before_state, before_latents = pipeline_state(pipe), generate_latents(pipe)

    def unchanged():
        assert pipeline_state(pipe) == before_state
        assert torch.equal(generate_latents(pipe), before_latents)

    paused = train_concept(pipe, make_spec(photos, tmp_path / "a", steps=4), cache_dir=tmp_path / "cache",
                           slice_s=1e-9)
    assert paused.status == "paused"
    unchanged()
    calls = iter([False, False, True])
    cancelled = train_concept(pipe, make_spec(photos, tmp_path / "b", steps=4), cache_dir=tmp_path / "cache",
                              should_stop=lambda: next(calls, True))
    assert cancelled.status == "cancelled"
    unchanged()

    def explode(info):
        if info.stage == "training":
            raise RuntimeError("progress sink broke")

    with pytest.raises(RuntimeError, match="progress sink broke"):
        train_concept(pipe, make_spec(photos, tmp_path / "c", steps=4), cache_dir=tmp_path / "cache",
                      on_progress=explode)
    unchanged()
    done = train_concept(pipe, make_spec(photos, tmp_path / "d", steps=2, sample_count=0),
                         cache_dir=tmp_path / "cache")
    assert done.status == "done"
    unchanged()


def test_other_adapters_survive_training_with_their_active_state(tiny_pipeline, tiny_model_dir, photos, tmp_path):
    """Generation keeps its LoRAs loaded in the shared pipeline: training must neither drop nor use them."""
    from trainer.models.loading import load_pipeline

    first = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "first", steps=2, sample_count=0),
                          cache_dir=tmp_path / "cache").result
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")
    pipe.load_lora_weights(first["lora"], adapter_name="gen_other")
    pipe.set_adapters(["gen_other"], adapter_weights=[0.7])
    before_state, before_latents = pipeline_state(pipe), generate_latents(pipe)

    plain = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "plain", steps=2, sample_count=0),
                          cache_dir=tmp_path / "cache").result
    beside = train_concept(pipe, make_spec(photos, tmp_path / "beside", steps=2, sample_count=0),
                           cache_dir=tmp_path / "cache").result

    assert pipeline_state(pipe) == before_state
    assert pipe.get_list_adapters() == {"unet": ["gen_other"], "text_encoder": ["gen_other"]}
    assert torch.equal(generate_latents(pipe), before_latents)
    # The other adapter was off while training: same LoRA as on a pipeline without it.
    a, b = load_file(plain["lora"]), load_file(beside["lora"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_images_are_generated_once_and_reused(tiny_pipeline, photos, tmp_path):
    cache = tmp_path / "cache"
    first_events, second_events = [], []
    train_concept(tiny_pipeline, make_spec(photos, tmp_path / "one", steps=1, sample_count=0, class_images=3),
                  cache_dir=cache, on_progress=first_events.append)
    [prior_dir] = (cache / "priors").iterdir()
    files = sorted(prior_dir.iterdir())
    assert [f.name for f in files] == ["000.png", "001.png", "002.png", "info.json", "latents.safetensors"]
    assert any(e.stage == "class_images" for e in first_events)
    os.utime(prior_dir / "info.json", ns=(0, 0))  # made long ago
    stamps = {f.name: f.stat().st_mtime_ns for f in files}

    other = write_solid_photos(tmp_path / "other-photos", 3)
    train_concept(tiny_pipeline, make_spec(other, tmp_path / "two", concept_id="c2", token="zorblat", steps=1,
                                           sample_count=0, class_images=3),
                  cache_dir=cache, on_progress=second_events.append)
    assert not any(e.stage == "class_images" for e in second_events)
    after = {f.name: f.stat().st_mtime_ns for f in prior_dir.iterdir()}
    assert after["info.json"] > 0  # reading it marked the set used today (priors.prune_unused)
    assert {**after, "info.json": None} == {**stamps, "info.json": None}  # nothing made or written again

    # Another class (or count) is another set.
    train_concept(tiny_pipeline, make_spec(photos, tmp_path / "three", class_name="dog", steps=1, sample_count=0,
                                           class_images=3), cache_dir=cache)
    assert len(list((cache / "priors").iterdir())) == 2


def test_class_image_progress_counts_images_with_an_eta_across_slices(tiny_pipeline, photos, tmp_path):
    spec = make_spec(photos, tmp_path / "out", steps=1, sample_count=0, class_images=3)
    events = []
    # On CPU class images come two at a time: the first slice makes two, then its deadline has passed.
    paused = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", slice_s=1e-9, on_progress=events.append)
    assert (paused.status, paused.step) == ("paused", 0)
    assert (checkpoint.checkpoint_dir(spec.out_dir) / checkpoint.STATE_FILE).is_file()  # the next slice goes on
    done = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", on_progress=events.append)
    assert done.status == "done" and not checkpoint.checkpoint_dir(spec.out_dir).exists()
    made = [(e.step, e.total, e.eta_s is not None, e.detail) for e in events if e.stage == "class_images"]
    assert made == [(0, 3, False, "making class images 0/3"), (2, 3, True, "making class images 2/3"),
                    (2, 3, False, "making class images 2/3"), (3, 3, True, "making class images 3/3")]
    assert all(e.eta_s >= 0 for e in events if e.stage == "class_images" and e.eta_s is not None)


def test_cancel_stops_at_a_step_boundary_and_leaves_no_lora(tiny_pipeline, photos, tmp_path):
    events = []

    def should_stop():  # asked between sampler steps of the class images too: cancel once training has begun
        return any(e.stage == "training" and e.step >= 2 for e in events)

    spec = make_spec(photos, tmp_path / "out", steps=50, sample_count=0)
    outcome = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", should_stop=should_stop,
                            on_progress=events.append)
    assert outcome.status == "cancelled" and outcome.result is None
    assert 2 <= outcome.step < 50
    assert max(e.step for e in events if e.stage == "training") == outcome.step
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    assert not checkpoint.checkpoint_dir(spec.out_dir).exists()


def test_a_finished_training_is_not_run_twice(tiny_pipeline, photos, tmp_path):
    spec = make_spec(photos, tmp_path / "out", steps=2, sample_count=0)
    first = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache")
    assert not checkpoint.checkpoint_dir(spec.out_dir).exists()  # the result is recorded beside the LoRA instead
    assert json.loads((spec.out_dir / "training.json").read_text())["result"] == first.result
    events = []
    second = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", on_progress=events.append)
    assert second == first and events == []
    Path(first.result["lora_kohya"]).unlink()  # a file is gone: trained again, not answered from the record
    third = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", on_progress=events.append)
    assert third.status == "done" and events and Path(first.result["lora_kohya"]).is_file()


def test_photos_without_usable_images_are_a_user_error(tiny_pipeline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="No usable photos"):
        train_concept(tiny_pipeline, make_spec(empty, tmp_path / "out"), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="photos for this training are missing"):
        train_concept(tiny_pipeline, make_spec(tmp_path / "nowhere", tmp_path / "out"), cache_dir=tmp_path / "cache")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="000.png could not be read"):
        train_concept(tiny_pipeline, make_spec(broken, tmp_path / "out"), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="steps"):
        make_spec(empty, tmp_path / "out", steps=0).validate()
    with pytest.raises(UserError, match="resolution"):
        train_concept(tiny_pipeline, make_spec(write_solid_photos(tmp_path / "p", 1), tmp_path / "out", resolution=33),
                      cache_dir=tmp_path / "cache")


def test_spec_from_worker_params_and_defaults(tmp_path):
    params = {"concept_id": 12, "token": "squidarth", "class_name": "man", "style": False,
              "photos_dir": str(tmp_path / "p"), "out_dir": str(tmp_path / "o"), "steps": None, "seed": 5,
              "slice_s": 8.0, "train_text_encoder": False, "job_extra": "ignored"}
    spec = TrainSpec.from_params(params)
    assert (spec.concept_id, spec.seed, spec.slice_s, spec.train_text_encoder, spec.steps) == ("12", 5, 8.0, False, None)
    assert spec.photos_dir == tmp_path / "p" and spec.uses_prior
    assert TrainSpec.from_params({**params, "style": True}).uses_prior is False
    assert spec.adapter_name == "boothbot_train_12"
    with pytest.raises(ValueError, match="token"):
        TrainSpec.from_params({k: v for k, v in params.items() if k != "token"})
    assert default_steps(3, "man") == 800 and default_steps(10, "man") == 1000 and default_steps(30, "man") == 1500
    assert default_steps(3, "dog") == 500


def test_previews_are_written_and_reported_while_training(tiny_pipeline, photos, tmp_path):
    preview = tmp_path / "previews" / "41.webp"
    events = []
    spec = make_spec(photos, tmp_path / "out", steps=4, sample_count=0, preview_path=preview)
    assert spec.preview_interval(4) == 1  # a fifth of the steps, rounded up
    train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", on_progress=events.append)
    with Image.open(preview) as image:
        assert image.format == "WEBP" and image.size == (32, 32)
    training = [e for e in events if e.stage == "training"]
    assert training[0].preview == str(preview.resolve())  # made after step 1, reported with it
    assert all(e.preview == str(preview.resolve()) for e in training)
    quiet = []
    train_concept(tiny_pipeline, make_spec(photos, tmp_path / "quiet", steps=2, sample_count=0),
                  cache_dir=tmp_path / "cache", on_progress=quiet.append)
    assert all(e.preview is None for e in quiet)


@pytest.mark.parametrize("spacing, expected", [(0.0, [2, 4, 6, 8]), (1e9, [2])])
def test_default_previews_are_spaced_by_their_own_cost(tiny_pipeline, photos, tmp_path, monkeypatch, spacing, expected):
    from trainer.training import engine

    made_at = []  # the step each preview is made after
    original = engine._Slice._preview

    def counted(self):
        made_at.append(self.step)
        return original(self)

    monkeypatch.setattr(engine, "PREVIEW_SPACING", spacing)
    monkeypatch.setattr(engine._Slice, "_preview", counted)
    spec = make_spec(photos, tmp_path / "out", steps=10, sample_count=0, preview_path=tmp_path / "p.webp",
                     prior_preservation=False)
    assert train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache").status == "done"
    assert made_at == expected  # every fifth of the steps, then only once the training ran 9x the last one's time
    made_at.clear()
    explicit = make_spec(photos, tmp_path / "explicit", steps=10, sample_count=0, preview_path=tmp_path / "e.webp",
                         preview_every=3, prior_preservation=False)
    assert train_concept(tiny_pipeline, explicit, cache_dir=tmp_path / "cache").status == "done"
    assert made_at == [3, 6, 9]  # an interval given explicitly is kept


def test_a_preview_is_dropped_when_someone_starts_waiting_for_the_gpu_during_it(tiny_pipeline, photos, tmp_path):
    preview = tmp_path / "previews" / "42.webp"
    sampler_steps = []  # the preview's UNet calls (training steps run with gradients)
    hook = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: None if torch.is_grad_enabled() else sampler_steps.append(True))
    spec = make_spec(photos, tmp_path / "out", steps=4, sample_count=0, preview_path=preview, preview_every=2,
                     prior_preservation=False)
    try:
        paused = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache",
                               should_yield=lambda: bool(sampler_steps))  # a member's /imagine arrives then
    finally:
        hook.remove()
    assert (paused.status, paused.step) == ("paused", 2)
    assert len(sampler_steps) == 1 and not preview.exists()  # dropped after its first of 20 sampler steps
    done = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache")
    assert done.status == "done" and not preview.exists()  # the next preview would come at step 4, the last


def test_no_preview_is_started_when_someone_already_waits_for_the_gpu(tiny_pipeline, photos, tmp_path):
    preview = tmp_path / "previews" / "43.webp"
    sampler_steps, boundaries = [], []  # the preview's UNet calls; the training's questions at step boundaries
    hook = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: None if torch.is_grad_enabled() else sampler_steps.append(True))
    spec = make_spec(photos, tmp_path / "out", steps=4, sample_count=0, preview_path=preview, preview_every=2,
                     prior_preservation=False)

    def someone_waits_from_step_2() -> bool:
        boundaries.append(True)
        return len(boundaries) >= 3  # asked once the inputs are ready, after step 1, then after step 2

    try:
        paused = train_concept(tiny_pipeline, spec, cache_dir=tmp_path / "cache", should_yield=someone_waits_from_step_2)
    finally:
        hook.remove()
    assert (paused.status, paused.step) == ("paused", 2)
    assert not sampler_steps and not preview.exists()  # the preview due after step 2 was not begun
