"""GenerationService on the tiny random pipeline: real diffusers + peft, 64 px, few steps, CPU."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO_ROOT
from trainer.contract.errors import Cancelled, UserError
from trainer.generation.service import GenerationService, ImagineRequest
from trainer.generation.pnginfo import lora_hash, parse_parameters, read_exif_parameters, read_png_parameters
from trainer.generation.prompt_embeds import encode_prompts, encode_prompts_many

STEPS = 3
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def active_adapters(pipe) -> dict[str, list[str]]:
    """The adapters active on each LoRA-capable model, as its peft layers see them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    result = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        if not getattr(model, "peft_config", None):
            continue
        layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        result[component] = [] if layer.disable_adapters else list(layer.active_adapters)
    return result


def make_lora(path: Path, seed: int, *, text_encoder: bool = False, metadata: dict | None = None) -> Path:
    """A concept LoRA file as training writes it (save_lora_weights, peft format), with random non-zero B weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from trainer.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    torch.manual_seed(seed)
    models = [pipe.unet] + ([pipe.text_encoder] if text_encoder else [])
    targets = [LORA_TARGETS, ["q_proj", "k_proj", "v_proj", "out_proj"]]
    for model, target in zip(models, targets):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=target))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder) if text_encoder else None,
        weight_name=path.name)
    if metadata:
        save_file(load_file(path), path, metadata={"format": "pt", **metadata})
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"sid": make_lora(root / "sid.safetensors", 1, text_encoder=True),
            "rex": make_lora(root / "rex.safetensors", 2)}


@pytest.fixture(scope="module")
def service(tiny_pipeline):
    service = GenerationService(tiny_pipeline, model_name="tiny", model_hash="0123456789")
    yield service
    service.adapters.clear()
    assert not any(name.startswith("gen_") for names in tiny_pipeline.get_list_adapters().values() for name in names)


def concept(loras, token, class_name="man", weight=1.0):
    return {"concept_id": token, "token": token, "class_name": class_name, "lora_path": str(loras[token]), "weight": weight}


def request(tmp_path, name="out", **params) -> ImagineRequest:
    base = {"prompt": "a photo of sid", "seed": 11, "steps": STEPS, "width": 64, "height": 64, "out_dir": tmp_path / name}
    return ImagineRequest.from_params({**base, **params})


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_same_seed_same_pixels_and_seeds_are_reported(service, tmp_path):
    first = service.imagine(request(tmp_path, "a", count=2))
    again = service.imagine(request(tmp_path, "b", count=2))
    other = service.imagine(request(tmp_path, "c", seed=12))
    assert first.seed == 11 and first.seeds == [11, 12] and len(first.images) == 2 and Path(first.grid).is_file()
    assert Image.open(first.grid).size == (128, 64)
    for a, b in zip(first.images, again.images):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first.images[0]), pixels(first.images[1]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))
    drawn = service.imagine(request(tmp_path, "d", seed=None))
    assert isinstance(drawn.seed, int) and drawn.seeds == [drawn.seed]
    assert parse_parameters(drawn.parameters)["Seed"] == str(drawn.seed)


def test_lora_on_changes_the_image_and_leaves_nothing_active(service, loras, tmp_path):
    seen_during = []
    plain = service.imagine(request(tmp_path, "plain", prompt="a photo of sid man"))
    with_lora = service.imagine(request(tmp_path, "lora", concepts=[concept(loras, "sid")]),  # -> "a photo of sid man"
                                on_progress=lambda info: seen_during.append(active_adapters(service.pipe)))
    plain_again = service.imagine(request(tmp_path, "plain2", prompt="a photo of sid man"))
    service.pipe.disable_lora()  # e.g. left behind by someone else: a concept request must still get its LoRA
    with_lora_again = service.imagine(request(tmp_path, "lora2", concepts=[concept(loras, "sid")]))
    assert np.array_equal(pixels(with_lora.images[0]), pixels(with_lora_again.images[0]))
    assert not np.array_equal(pixels(plain.images[0]), pixels(with_lora.images[0]))
    assert np.array_equal(pixels(plain.images[0]), pixels(plain_again.images[0]))  # no leak once LoRAs are loaded
    cached = service.adapters.get(loras["sid"], "sid")
    assert set(cached.layers) == {"unet", "text_encoder"}  # the text encoder's part is applied while encoding
    assert not any(seen_during[0].values())  # one LoRA group: folded into the weights, no adapter active
    assert not any(active_adapters(service.pipe).values())
    assert not [n for n, p in service.pipe.unet.named_parameters() if p.requires_grad and "lora" in n]


def test_switching_a_b_a_equals_a_fresh_a(tiny_pipeline, tiny_model_dir, loras, tmp_path):
    from trainer.models.loading import load_pipeline

    small = GenerationService(tiny_pipeline, model_name="tiny", adapter_capacity=1)  # forces evict + reload
    try:
        sid = [concept(loras, "sid")]
        a = small.imagine(request(tmp_path, "a", concepts=sid))
        b = small.imagine(request(tmp_path, "b", prompt="a photo of rex", concepts=[concept(loras, "rex", "dog")]))
        loads = small.adapters.loads
        a2 = small.imagine(request(tmp_path, "a2", concepts=sid))
        assert small.adapters.loads == loads + 1  # sid was evicted for rex, so it came back from the file
    finally:
        small.adapters.clear()
    fresh = GenerationService(load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32"), model_name="tiny")
    a_fresh = fresh.imagine(request(tmp_path, "fresh", concepts=sid))
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.array_equal(pixels(a.images[0]), pixels(a2.images[0]))
    assert np.array_equal(pixels(a.images[0]), pixels(a_fresh.images[0]))


def test_two_concepts_in_one_prompt_each_with_a_weight(service, loras, tmp_path):
    both = [concept(loras, "sid"), concept(loras, "rex", "dog", weight=0.8)]
    seen = []
    together = service.imagine(request(tmp_path, "ab", prompt="sid and rex", concepts=both),
                               on_progress=lambda info: seen.append(active_adapters(service.pipe).get("unet")))
    only_sid = service.imagine(request(tmp_path, "a", prompt="sid and rex", concepts=both[:1]))
    lighter = service.imagine(request(tmp_path, "ab2", prompt="sid and <lora:rex:0.3> rex", concepts=both))
    assert not seen[0]  # both LoRAs folded into the weights, no adapter active
    assert not np.array_equal(pixels(together.images[0]), pixels(only_sid.images[0]))
    assert not np.array_equal(pixels(together.images[0]), pixels(lighter.images[0]))
    info = parse_parameters(together.parameters)
    assert info["Prompt"] == "sid man and rex dog <lora:rex:0.8> <lora:sid:1>"
    assert info["Lora hashes"] == f"rex: {lora_hash(loras['rex'])}, sid: {lora_hash(loras['sid'])}"


def test_unknown_and_missing_loras_are_named(service, loras, tmp_path):
    with pytest.raises(UserError, match="no concept called ghost"):
        request(tmp_path, prompt="<lora:ghost:1> a photo")
    gone = {**concept(loras, "sid"), "lora_path": str(tmp_path / "deleted.safetensors")}
    with pytest.raises(UserError, match="LoRA file for sid is missing"):
        service.imagine(request(tmp_path, concepts=[gone]))


def test_parameters_chunk_is_complete_and_parses_back(service, loras, tmp_path):
    result = service.imagine(request(tmp_path, prompt="portrait of sid, red", negative="blurry, dark", cfg=6.5,
                                     scheduler="euler_a", job_id=42, concepts=[concept(loras, "sid", weight=0.9)]))
    text = read_png_parameters(result.images[0])
    assert text == result.parameters
    info = parse_parameters(text)
    assert info == {
        "Prompt": "portrait of sid man, red <lora:sid:0.9>", "Negative prompt": "blurry, dark", "Steps": str(STEPS),
        "Sampler": "Euler a", "CFG scale": "6.5", "Seed": "11", "Size": "64x64", "Model hash": "0123456789",
        "Model": "tiny", "Deep cache": "every 3 steps", "Lora hashes": f"sid: {lora_hash(loras['sid'])}",
        "Job id": "42",
    }


def test_over_the_upload_limit_comes_with_a_small_copy(service, tmp_path):
    result = service.imagine(request(tmp_path, count=2, upload_limit=2500))
    for png in result.images + [result.grid]:
        assert Path(png).stat().st_size > 2500
        small = Path(result.small[png])
        assert small.suffix == ".webp" and small.stat().st_size <= 2500
    assert read_exif_parameters(result.small[result.images[0]]) == read_png_parameters(result.images[0])
    roomy = service.imagine(request(tmp_path, "roomy", upload_limit=10 * 2**20))
    assert roomy.small == {}


def test_model_size_bounds_named(service, tmp_path):
    assert service.native_side == 64 and service.size_range() == (64, 128)
    with pytest.raises(UserError, match="from 64 to 128"):
        service.imagine(request(tmp_path, width=256))


def test_long_prompt_uses_every_chunk(service, tmp_path):
    pipe = service.pipe
    short = encode_prompts(pipe.tokenizer, pipe.text_encoder, "a photo of sid", "blurry")
    reference, negative = pipe.encode_prompt("a photo of sid", "cpu", 1, True, "blurry")
    assert torch.equal(short.prompt, reference) and torch.equal(short.negative, negative)

    head = "a photo of the man, " * 16  # 80 tokens on the tiny tokenizer: more than one chunk
    red, blue = encode_prompts(pipe.tokenizer, pipe.text_encoder, head + "red", ""), \
        encode_prompts(pipe.tokenizer, pipe.text_encoder, head + "blue", "")
    assert red.tokens > 77 and red.prompt.shape[1] == 154 and red.negative.shape == red.prompt.shape
    assert not torch.equal(red.prompt[:, 77:], blue.prompt[:, 77:]) and red.truncated_to is None
    cut = encode_prompts(pipe.tokenizer, pipe.text_encoder, head + "red", "", max_chunks=1)
    assert cut.prompt.shape[1] == 77 and cut.truncated_to == 75

    a = service.imagine(request(tmp_path, "red", prompt=head + "red"))
    b = service.imagine(request(tmp_path, "blue", prompt=head + "blue"))
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0])) and a.notices == []


def test_several_prompts_in_one_pass_equal_each_alone(service):
    pipe = service.pipe
    long = "a photo of the man, " * 16 + "red"  # two chunks
    pairs = [("a photo of sid", "blurry"), (long, ""), ("a dog", long), (long, "blurry")]
    together = encode_prompts_many(pipe.tokenizer, pipe.text_encoder, pairs)
    cut = encode_prompts_many(pipe.tokenizer, pipe.text_encoder, pairs, max_chunks=1)
    for (prompt, negative), many, one_chunk in zip(pairs, together, cut):
        alone = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompt, negative)
        assert many.prompt.shape == alone.prompt.shape == many.negative.shape
        assert torch.allclose(many.prompt, alone.prompt, atol=1e-5)
        assert torch.allclose(many.negative, alone.negative, atol=1e-5)
        assert (many.tokens, many.truncated_to) == (alone.tokens, alone.truncated_to)
        assert one_chunk.prompt.shape[1] == 77 and one_chunk.truncated_to == (75 if prompt == long else None)
    assert [m.prompt.shape[1] for m in together] == [77, 154, 154, 154]


def test_cancel_at_a_step_boundary(service, loras, tmp_path):
    steps = []
    with pytest.raises(Cancelled):
        service.imagine(request(tmp_path, steps=5, concepts=[concept(loras, "sid")]),
                        on_progress=lambda info: steps.append(info.step), should_stop=lambda: len(steps) >= 2)
    assert steps == [1, 2]
    assert not list((tmp_path / "out").glob("*.png"))
    assert not active_adapters(service.pipe).get("unet")


def test_progress_and_preview(service, tmp_path, monkeypatch):
    # Previews are written at most once a second, so a tiny 4-step job would usually get none: lift the throttle.
    monkeypatch.setattr(service, "preview_min_interval_s", 0.0)
    events = []
    service.imagine(request(tmp_path, steps=4, count=2, preview_path=str(tmp_path / "previews" / "7.webp")),
                    on_progress=events.append)
    assert [(e.step, e.total) for e in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert events[0].eta_s > 0 and events[-1].eta_s == 0
    preview = tmp_path / "previews" / "7.webp"
    assert events[0].preview == str(preview)
    with Image.open(preview) as image:
        assert image.format == "WEBP" and image.size == (64, 32)  # two 32x32 latents side by side


def test_img2img_variation(service, tmp_path):
    source = service.imagine(request(tmp_path, "src"))
    params = dict(init_image=source.images[0], strength=0.5, steps=4)
    var1 = service.imagine(request(tmp_path, "v1", seed=5, **params))
    var2 = service.imagine(request(tmp_path, "v2", seed=5, **params))
    var3 = service.imagine(request(tmp_path, "v3", seed=6, **params))
    assert np.array_equal(pixels(var1.images[0]), pixels(var2.images[0]))
    assert not np.array_equal(pixels(var1.images[0]), pixels(var3.images[0]))
    assert not np.array_equal(pixels(var1.images[0]), pixels(source.images[0]))
    assert parse_parameters(var1.parameters)["Denoising strength"] == "0.5"
    with pytest.raises(UserError, match="nothing would change"):
        service.imagine(request(tmp_path, "v4", init_image=source.images[0], strength=0.1, steps=2))
    with pytest.raises(UserError, match="could not be read"):
        service.imagine(request(tmp_path, "v5", init_image=str(tmp_path / "nope.png")))


def test_safety_blocked_words(service, tmp_path):
    with pytest.raises(UserError, match='"gore"'):
        service.imagine(request(tmp_path, prompt="a photo, gore", safety=True, blocked_words=["gore", "blood"]))
    assert service.imagine(request(tmp_path, prompt="a photo, gore", safety=False, blocked_words=["gore"])).images


def test_safety_checker_hides_flagged_images(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=32)).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    guarded = StableDiffusionPipeline(**{**tiny_pipeline.components, "safety_checker": checker,
                                         "feature_extractor": extractor})
    service = GenerationService(guarded, model_name="tiny")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every image is "unsafe"
    flagged = service.imagine(request(tmp_path, "flagged", count=2, safety=True))
    assert flagged.images == [] and flagged.blocked == [0, 1] and flagged.grid is None
    assert "safety filter hid images 1, 2" in flagged.notices[0]
    assert not list((tmp_path / "flagged").glob("*.png"))
    unchecked = service.imagine(request(tmp_path, "off", count=2, safety=False))
    assert len(unchecked.images) == 2 and unchecked.blocked == []


def test_foreign_adapter_is_left_alone(service, tmp_path):
    """The training engine's adapter on the shared pipe is neither used nor deleted by generation."""
    from peft import LoraConfig

    pipe = service.pipe
    before = service.imagine(request(tmp_path, "before"))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                          adapter_name="concept_training")
    try:
        for name, param in pipe.unet.named_parameters():
            if "lora_B.concept_training" in name:
                torch.nn.init.normal_(param.data, std=0.5)
        after = service.imagine(request(tmp_path, "after"))  # the training adapter is active when we start
        assert np.array_equal(pixels(before.images[0]), pixels(after.images[0]))
        service.adapters.clear()
        assert "concept_training" in pipe.get_list_adapters()["unet"]
    finally:
        pipe.delete_adapters(["concept_training"])


def test_imagine_many_loops_over_requests(service, tmp_path):
    results = service.imagine_many([request(tmp_path, "m1"), request(tmp_path, "m2", seed=3)])
    assert [r.seed for r in results] == [11, 3]
    assert results[0].to_dict().keys() == {"images", "grid", "small", "seed", "seeds", "parameters", "blocked", "notices",
                                          "seconds"}
    assert all(r.seconds > 0 for r in results)


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    """`python -m trainer imagine` run once: (command, out dir, completed process)."""
    tmp_path = tmp_path_factory.mktemp("imagine-cli")
    lora = make_lora(tmp_path / "my_concept.safetensors", 3, metadata={"boothbot.token": "sid", "boothbot.class": "man"})
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "trainer", "imagine", "portrait of sid", "--model", str(tiny_model_dir),
               "--lora", f"{lora}:0.7", "--steps", "6", "--size", "64x64", "--count", "2", "--seed", "5",
               "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=300)  # bytes: keeps the \r
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return command, out, done


def test_cli_end_to_end(cli_run, tiny_model_dir):
    command, out, done = cli_run
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "seed: 5"
    assert lines[:3] == [str(out / "000.png"), str(out / "001.png"), str(out / "grid.png")]
    info = parse_parameters(read_png_parameters(out / "000.png"))
    assert info["Prompt"] == "portrait of sid man <lora:sid:0.7>" and info["Model"] == tiny_model_dir.name
    assert len(info["Model hash"]) == 10

    bad = subprocess.run(command[:5] + ["--steps", "500", "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "from 1 to 100" in bad.stderr


def test_cli_draws_one_bar_in_place_and_ends_with_a_summary_line(cli_run):
    done = cli_run[2]
    assert done.returncode == 0, done.stderr[-3000:]
    bar = done.stderr[done.stderr.index("\r["):]
    assert bar.count("\n") == 1 and bar.endswith("\n")  # one line, redrawn with carriage returns
    draws = [part.strip() for part in bar.rstrip("\n").split("\r")[1:]]
    assert len(draws) >= 3 and draws[0].split()[1] == "1/6" and draws[-2].split()[1] == "6/6"
    assert all(re.fullmatch(r"\[[#-]{30}\] \d/6  ETA \d+ s", d) for d in draws[:-1]), draws
    assert re.fullmatch(r"2 images in \d+\.\d s", draws[-1]), draws[-1]


def test_mixed_lora_batch_matches_each_request_alone(service, loras, tmp_path):
    """imagine_many puts different members' LoRAs in one forward (per-row rank mask) and gets what each gets alone."""
    plain = dict(prompt="a photo of sid man")
    specs = [dict(concepts=[concept(loras, "sid")], seed=1), dict(prompt="a photo of rex", seed=2,
             concepts=[concept(loras, "rex", "dog", weight=0.7)]), dict(plain, seed=3, count=2),
             dict(prompt="sid and rex", concepts=[concept(loras, "sid"), concept(loras, "rex", "dog")], seed=4)]
    alone = [service.imagine(request(tmp_path, f"alone{i}", **spec)) for i, spec in enumerate(specs)]
    loads = service.adapters.loads
    seen = []
    together = service.imagine_many([request(tmp_path, f"mixed{i}", **spec) for i, spec in enumerate(specs)],
                                    on_progress=lambda info: seen.append(service.adapters._mask["unet"].clone()))
    assert seen[0].shape[0] == 2 * 5  # one loop: 5 images, CFG doubles the rows
    assert not torch.equal(seen[0][0], seen[0][1])  # sid's and rex's rows see different ranks
    for a, b in zip(alone, together):
        assert a.seeds == b.seeds and len(a.images) == len(b.images)
        for pa, pb in zip(a.images, b.images):
            assert np.abs(pixels(pa) - pixels(pb)).max() <= 2
    assert not np.array_equal(pixels(together[0].images[0]), pixels(together[2].images[0]))
    assert not any(active_adapters(service.pipe).values())
    assert service.adapters.loads == loads  # files are read once; later requests only copy into the slot
