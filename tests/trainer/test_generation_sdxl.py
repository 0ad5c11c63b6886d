"""GenerationService on the tiny random SDXL pipeline (two text encoders, pooled + size conditioning): real diffusers +
peft, 64 px, few steps, CPU. The SD 1.x twins of these tests are in test_generation.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.test_generation import active_adapters, pixels
from trainer.contract.errors import UserError
from trainer.generation.pnginfo import lora_hash, parse_parameters
from trainer.generation.prompt_embeds import encode_prompts_xl
from trainer.generation.schedulers import make_scheduler
from trainer.generation.service import GenerationService, ImagineRequest

STEPS = 3
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_layers(seed: int, text_encoders: bool) -> dict[str, dict]:
    """Random LoRA layers (r=4, alpha=4, non-zero B) on the tiny SDXL UNet and, optionally, both text encoders."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from trainer.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family="sdxl")
    torch.manual_seed(seed)
    models = {"unet": (pipe.unet, UNET_TARGETS)}
    if text_encoders:
        models |= {"text_encoder": (pipe.text_encoder, TEXT_TARGETS), "text_encoder_2": (pipe.text_encoder_2, TEXT_TARGETS)}
    layers = {}
    for name, (model, targets) in models.items():
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                torch.nn.init.normal_(param, std=0.5)
        layers[name] = get_peft_model_state_dict(model)
    return layers


def make_sdxl_lora(path: Path, seed: int, *, text_encoders: bool = False) -> Path:
    """A concept LoRA file in diffusers/peft format, as StableDiffusionXLPipeline.save_lora_weights writes it."""
    from diffusers import StableDiffusionXLPipeline

    layers = peft_layers(seed, text_encoders)
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"), weight_name=path.name)
    return path


def make_kohya_lora(path: Path, seed: int) -> Path:
    """The same LoRA as make_sdxl_lora(seed, text_encoders=True), in kohya's key format (`lora_unet_`, `lora_te1_`,
    `lora_te2_`, `.alpha`) as other tools (sd-scripts, A1111 extensions) write it."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    layers = peft_layers(seed, text_encoders=True)
    peft = {f"{model}.{key}": value for model, state in layers.items() for key, value in state.items()}
    kohya = convert_state_dict_to_kohya(peft)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-loras")
    return {"sid": make_sdxl_lora(root / "sid.safetensors", 1, text_encoders=True),
            "rex": make_sdxl_lora(root / "rex.safetensors", 2),
            "kohya_sid": make_kohya_lora(root / "sid_kohya.safetensors", 1)}


@pytest.fixture(scope="module")
def service(tiny_sdxl_pipeline):
    service = GenerationService(tiny_sdxl_pipeline, model_name="tiny-sdxl", model_hash="abcdef0123")
    yield service
    service.adapters.clear()
    assert not any(name.startswith("gen_") for names in tiny_sdxl_pipeline.get_list_adapters().values()
                   for name in names)


def concept(loras, token, class_name="man", weight=1.0, file=None):
    return {"concept_id": token, "token": token, "class_name": class_name, "lora_path": str(loras[file or token]),
            "weight": weight}


def request(tmp_path, name="out", **params) -> ImagineRequest:
    base = {"prompt": "a photo of sid", "seed": 11, "steps": STEPS, "width": 64, "height": 64, "out_dir": tmp_path / name}
    return ImagineRequest.from_params({**base, **params})


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_prompt_embeddings_are_diffusers_own(tiny_sdxl_pipeline, negative):
    """Both encoders side by side, pooled from the second; an empty negative is zeros (force_zeros_for_empty_prompt)."""
    pipe = tiny_sdxl_pipeline
    theirs = pipe.encode_prompt("a photo of a red dog", device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=True, negative_prompt=negative)
    ours = encode_prompts_xl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                             "a photo of a red dog", negative or "", zero_empty_negative=True)
    for mine, reference in zip((ours.prompt, ours.negative, ours.pooled, ours.negative_pooled), theirs):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference)
    assert (ours.negative == 0).all() == (negative is None)


def test_same_seed_same_pixels_as_the_plain_sdxl_pipeline(tiny_sdxl_pipeline, tmp_path):
    """With the deep cache off (every step whole): diffusers' own pipeline, pixel for pixel."""
    from diffusers import StableDiffusionXLPipeline

    service = GenerationService(tiny_sdxl_pipeline, model_name="tiny-sdxl", deep_cache_every=1)
    first = service.imagine(request(tmp_path, "a", prompt="a red dog", count=2))
    again = service.imagine(request(tmp_path, "b", prompt="a red dog", count=2))
    assert first.seeds == [11, 12] and "Deep cache" not in first.parameters
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(first.images[1]))
    components = {**tiny_sdxl_pipeline.components,
                  "scheduler": make_scheduler("dpmpp_2m_karras", tiny_sdxl_pipeline.scheduler.config)}
    plain = StableDiffusionXLPipeline(**components, add_watermarker=False)
    image = plain("a red dog", num_inference_steps=STEPS, guidance_scale=7.0, width=64, height=64,
                  generator=torch.Generator("cpu").manual_seed(11)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - pixels(first.images[0])).max() <= 1


def test_parameters_carry_the_sdxl_size_fields(service, loras, tmp_path):
    result = service.imagine(request(tmp_path, "p", prompt="sid at the sea", concepts=[concept(loras, "sid")],
                                     width=64, height=128, negative="blurry"))
    info = parse_parameters(result.parameters)
    assert info["Size"] == info["Original size"] == info["Target size"] == "64x128"
    assert info["Crop top-left"] == "0x0"
    assert info["Model"] == "tiny-sdxl" and info["Model hash"] == "abcdef0123"
    assert info["Negative prompt"] == "blurry" and info["Prompt"] == "sid man at the sea <lora:sid:1>"
    assert info["Lora hashes"] == f"sid: {lora_hash(loras['sid'])}"


def test_a_lora_reaches_the_unet_and_both_text_encoders(service, loras, tmp_path):
    cached = service.adapters.get(loras["sid"], "sid")
    assert set(cached.layers) == {"unet", "text_encoder", "text_encoder_2"}
    plain = service.imagine(request(tmp_path, "plain"))
    with_lora = service.imagine(request(tmp_path, "lora", concepts=[concept(loras, "sid")]))
    assert not np.array_equal(pixels(plain.images[0]), pixels(with_lora.images[0]))
    assert service.adapters.runs["text_encoder_2 folded"] >= 1
    assert not any(active_adapters(service.pipe).values())


def test_text_encoders_folded_equal_diffusers_adapter(service, loras):
    """Folding the LoRA's text-encoder layers into both encoders gives the embeddings diffusers' own adapter gives."""
    pipe = service.pipe
    lora = service.adapters.get(loras["sid"], "sid")
    with service.adapters.folded("text_encoder", ((lora, 1.0),)), \
            service.adapters.folded("text_encoder_2", ((lora, 1.0),)):
        folded = encode_prompts_xl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                   "a photo of sid", "", zero_empty_negative=True)
    pipe.load_lora_weights(str(loras["sid"]), adapter_name="reference")
    try:
        reference = pipe.encode_prompt("a photo of sid", device="cpu", do_classifier_free_guidance=False)
    finally:
        pipe.delete_adapters(["reference"])
    torch.testing.assert_close(folded.prompt, reference[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded.pooled, reference[2], atol=1e-5, rtol=1e-4)


def test_switching_a_b_a_equals_a_fresh_a(tiny_sdxl_pipeline, tiny_sdxl_model_dir, loras, tmp_path):
    from trainer.models.loading import load_pipeline

    small = GenerationService(tiny_sdxl_pipeline, model_name="tiny", adapter_capacity=1)  # forces evict + reload
    try:
        sid = [concept(loras, "sid")]
        a = small.imagine(request(tmp_path, "a", concepts=sid))
        b = small.imagine(request(tmp_path, "b", prompt="a photo of rex", concepts=[concept(loras, "rex", "dog")]))
        loads = small.adapters.loads
        a2 = small.imagine(request(tmp_path, "a2", concepts=sid))
        assert small.adapters.loads == loads + 1
    finally:
        small.adapters.clear()
    fresh = GenerationService(load_pipeline(str(tiny_sdxl_model_dir), device="cpu", dtype="fp32"), model_name="tiny")
    a_fresh = fresh.imagine(request(tmp_path, "fresh", concepts=sid))
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.array_equal(pixels(a.images[0]), pixels(a2.images[0]))
    assert np.array_equal(pixels(a.images[0]), pixels(a_fresh.images[0]))


def test_kohya_and_diffusers_files_give_the_same_image(service, loras, tmp_path):
    diffusers_file = service.imagine(request(tmp_path, "d", concepts=[concept(loras, "sid")]))
    kohya_file = service.imagine(request(tmp_path, "k", concepts=[concept(loras, "sid", file="kohya_sid")]))
    kohya = service.adapters.get(loras["kohya_sid"], "sid")
    assert set(kohya.layers) == {"unet", "text_encoder", "text_encoder_2"}
    assert np.abs(pixels(diffusers_file.images[0]) - pixels(kohya_file.images[0])).max() <= 2


def test_mixed_lora_batch_matches_each_request_alone(service, loras, tmp_path):
    specs = [dict(concepts=[concept(loras, "sid")], seed=1),
             dict(prompt="a photo of rex", seed=2, concepts=[concept(loras, "rex", "dog", weight=0.7)]),
             dict(prompt="a photo of sid man", seed=3, count=2)]
    alone = [service.imagine(request(tmp_path, f"alone{i}", **spec)) for i, spec in enumerate(specs)]
    seen = []
    together = service.imagine_many([request(tmp_path, f"mixed{i}", **spec) for i, spec in enumerate(specs)],
                                    on_progress=lambda info: seen.append(service.adapters._mask["unet"].clone()))
    assert seen[0].shape[0] == 2 * 4  # one loop: 4 images, CFG doubles the rows
    for a, b in zip(alone, together):
        assert a.seeds == b.seeds
        for pa, pb in zip(a.images, b.images):
            assert np.abs(pixels(pa) - pixels(pb)).max() <= 2
    assert not any(active_adapters(service.pipe).values())


def test_img2img_variation_and_preview(service, tmp_path):
    service.preview_min_interval_s = 0.0
    try:
        source = service.imagine(request(tmp_path, "src", steps=6))
    finally:
        service.preview_min_interval_s = 1.0
    assert (tmp_path / "src" / "preview.webp").is_file()
    params = dict(init_image=source.images[0], strength=0.5, steps=4)
    var1 = service.imagine(request(tmp_path, "v1", seed=5, **params))
    var2 = service.imagine(request(tmp_path, "v2", seed=5, **params))
    var3 = service.imagine(request(tmp_path, "v3", seed=6, **params))
    assert np.array_equal(pixels(var1.images[0]), pixels(var2.images[0]))
    assert not np.array_equal(pixels(var1.images[0]), pixels(var3.images[0]))
    assert not np.array_equal(pixels(var1.images[0]), pixels(source.images[0]))
    assert parse_parameters(var1.parameters)["Denoising strength"] == "0.5"


def test_long_prompts_use_both_encoders_on_every_chunk(service, tmp_path):
    long = "a photo of sid " + "with a red dog " * 30  # ~120 tokens: two chunks
    embeddings = encode_prompts_xl([service.pipe.tokenizer, service.pipe.tokenizer_2],
                                   [service.pipe.text_encoder, service.pipe.text_encoder_2], long, "",
                                   zero_empty_negative=True)
    assert embeddings.prompt.shape == (1, 154, 64) and embeddings.pooled.shape == (1, 32)
    assert embeddings.negative.shape == embeddings.prompt.shape
    result = service.imagine(request(tmp_path, "long", prompt=long))
    assert len(result.images) == 1 and not result.notices


def test_shape_names_become_the_sdxl_sizes(service, tmp_path):
    with pytest.raises(UserError, match=r"896×1152 is not a size this model can make"):
        service.imagine(request(tmp_path, "shape", width=None, height=None, size="portrait"))
    with pytest.raises(UserError, match="Unknown picture shape 'huge'"):
        request(tmp_path, "shape", size="huge")


def test_sdxl_previews_use_the_sdxl_latent_colours():
    from trainer.generation.previews import latents_to_images

    zero = torch.zeros(1, 4, 8, 8)
    sd1 = np.asarray(latents_to_images(zero, 1)[0])
    sdxl = np.asarray(latents_to_images(zero, 1, family="sdxl")[0])
    assert (sd1 == 127).all()
    assert tuple(sdxl[0, 0]) == (141, 125, 127)  # SDXL's approximation has a bias: its zero latent is not grey
