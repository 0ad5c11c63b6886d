"""bench.quality end to end at CI size: build a tiny world model (real diffusers classes, a few steps of each part),
load it with the bot's loader, train a concept with the bot's engine and score it from the bot's generations.

This checks the wiring only: a tiny model trained for 4 steps knows nothing, so no quality threshold is asserted
here (see docs/TRAINING.md, "Concept quality on a world model")."""
from __future__ import annotations

import json

from bench.quality import recipes, scores, world
from bench.quality.generate import Sampling
from bench.quality.world_model import INFO_FILE, READERS_FILE, build, load_world_pipeline, load_world_readers


def test_a_tiny_world_model_is_built_loaded_by_the_bot_and_scores_a_concept(tmp_path, capsys):
    info = build(tmp_path / "wm", size="tiny", log=lambda line: None)
    assert json.loads((tmp_path / "wm" / INFO_FILE).read_text()) == info
    assert (tmp_path / "wm" / READERS_FILE).is_file()
    assert info["denoiser"]["steps"] == 4

    pipe = load_world_pipeline(tmp_path / "wm")  # trainer.models.loading.load_pipeline
    assert [type(m).__name__ for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer)] == [
        "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer"]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    readers = load_world_readers(tmp_path / "wm")

    plan = scores.Plan(per_prompt=1, class_images=2, other_images=1, sampling=Sampling(steps=2))
    rows = recipes.run(pipe, readers, ["smoke"], tmp_path / "work", plan=plan,
                       extra={"smoke": dict(steps=2, class_images=2)}, log=lambda line: None)

    assert list(rows) == ["base", "smoke"]
    assert rows["smoke"]["steps"] == 2
    assert (tmp_path / "work" / "concepts" / "smoke" / "lora.safetensors").is_file()
    for row in rows.values():
        assert all(0.0 <= row[column] <= 1.0 for column in recipes.COLUMNS), row
    # the base model is its own reference: no distance from itself on the same seeds
    assert rows["base"]["prior_tv"] == 0 and rows["base"]["leak_tv"] == 0
    table = recipes.markdown(rows)
    assert table.count("\n") == 3 and "| smoke | 2 |" in table

    # `python -m bench.quality check --steps N`: the world model's prompt following at a sampler step count
    from bench.quality.__main__ import main

    capsys.readouterr()
    assert main(["check", "--model", str(tmp_path / "wm"), "--count", "2", "--steps", "3", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampling"]["steps"] == 3 and set(report["prompt_following"]) == set(world.ATTRIBUTES)
