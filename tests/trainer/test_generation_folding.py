"""LoRAs folded into the base weights (one LoRA group for every row) vs the slot path, on the tiny pipeline, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer.generation.service as generation
from tests.trainer.test_generation import concept, make_lora, pixels
from tests.trainer.test_generation import request as full_request
from trainer.contract.errors import Cancelled
from trainer.generation.service import GenerationService
from trainer.generation.prompt_embeds import encode_prompts


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold-loras")
    return {"sid": make_lora(root / "sid.safetensors", 4, text_encoder=True),
            "rex": make_lora(root / "rex.safetensors", 5)}


@pytest.fixture(scope="module")
def service(tiny_pipeline):
    service = GenerationService(tiny_pipeline, model_name="tiny")
    yield service
    service.adapters.clear()


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """A copy of every parameter of the UNet and text encoder that is not a LoRA factor, by its name without peft."""
    return {f"{component}.{name}".replace(".base_layer", ""): param.detach().clone()
            for component in ("unet", "text_encoder")
            for name, param in getattr(pipe, component).named_parameters() if ".lora_" not in name}


def assert_same_weights(pipe, saved: dict[str, torch.Tensor]) -> None:
    now = base_weights(pipe)
    assert now.keys() == saved.keys()
    changed = [name for name in saved if not torch.equal(now[name], saved[name])]
    assert not changed, f"base weights changed: {changed[:5]}"


def request(tmp_path, name, **params):
    return full_request(tmp_path, name, **{"steps": 2, **params})


def slot_only(monkeypatch):
    """Make every denoising loop take the slot path, as a mixed batch does."""
    monkeypatch.setattr(generation, "same_loras", lambda groups: False)


def test_folded_equals_slot_for_one_lora_and_differs_from_no_lora(service, loras, tmp_path, monkeypatch):
    runs = service.adapters.runs
    sid = [concept(loras, "sid", weight=0.8)]
    before = runs.copy()
    folded = service.imagine(request(tmp_path, "folded", concepts=sid))
    assert runs["unet folded"] == before["unet folded"] + 1 and runs["unet slot"] == before["unet slot"]
    plain = service.imagine(request(tmp_path, "plain", prompt="a photo of sid man"))
    with monkeypatch.context() as patch:
        slot_only(patch)
        slot = service.imagine(request(tmp_path, "slot", concepts=sid))
    assert runs["unet slot"] == before["unet slot"] + 1
    for a, b, c in zip(folded.images, slot.images, plain.images):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
        assert np.abs(pixels(a) - pixels(c)).max() > 10


def test_text_encoder_folded_equals_diffusers_adapter(service, loras):
    pipe = service.pipe
    group = ((service.adapters.get(loras["sid"], "sid"), 0.7),)
    plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, "a photo of sid man", "")
    with service.adapters.folded("text_encoder", group):
        folded = encode_prompts(pipe.tokenizer, pipe.text_encoder, "a photo of sid man", "")
    pipe.load_lora_weights(str(loras["sid"]), adapter_name="reference")
    try:
        pipe.enable_lora()  # another test may have left a disable_lora() behind; folding does not care
        pipe.set_adapters(["reference"], [0.7])
        reference = encode_prompts(pipe.tokenizer, pipe.text_encoder, "a photo of sid man", "")
    finally:
        pipe.delete_adapters(["reference"])
    assert torch.allclose(folded.prompt, reference.prompt, atol=1e-5)
    assert not torch.allclose(folded.prompt, plain.prompt, atol=1e-2)


def test_base_weights_come_back_bit_exact(service, loras, tmp_path):
    pipe, adapters = service.pipe, service.adapters
    sid, rex = [concept(loras, "sid")], [concept(loras, "rex", "dog", weight=1.3)]
    saved = base_weights(pipe)
    service.imagine(request(tmp_path, "a", concepts=sid))
    assert_same_weights(pipe, saved)
    service.imagine(request(tmp_path, "b", prompt="a photo of rex", concepts=rex))
    service.imagine(request(tmp_path, "a2", concepts=sid))
    assert_same_weights(pipe, saved)

    group = ((adapters.get(loras["sid"], "sid"), 1.0),)
    with pytest.raises(ZeroDivisionError):
        with adapters.folded("unet", group):
            inside = base_weights(pipe)
            assert sum(not torch.equal(inside[k], saved[k]) for k in saved) == len(group[0][0].layers["unet"])
            1 / 0
    assert_same_weights(pipe, saved)
    steps = []
    with pytest.raises(Cancelled):
        service.imagine(request(tmp_path, "cancel", steps=4, concepts=sid), on_progress=lambda i: steps.append(i),
                        should_stop=lambda: len(steps) >= 1)
    assert_same_weights(pipe, saved)
    with pytest.raises(RuntimeError, match="already folded"):
        with adapters.folded("unet", group), adapters.folded("unet", group):
            pass
    assert_same_weights(pipe, saved)

    service.release_memory()
    assert adapters._backups == {}
    again = service.imagine(request(tmp_path, "again", concepts=sid))
    assert np.array_equal(pixels(again.images[0]), pixels(tmp_path / "a" / "000.png"))
    assert_same_weights(pipe, saved)


def test_two_concepts_in_one_prompt_folded_equals_slot(service, loras, tmp_path, monkeypatch):
    both = [concept(loras, "sid", weight=0.9), concept(loras, "rex", "dog", weight=0.6)]
    folded = service.imagine(request(tmp_path, "folded", prompt="sid and rex", concepts=both))
    only_sid = service.imagine(request(tmp_path, "sid", prompt="sid and rex", concepts=both[:1]))
    with monkeypatch.context() as patch:
        slot_only(patch)
        slot = service.imagine(request(tmp_path, "slot", prompt="sid and rex", concepts=both))
    assert np.abs(pixels(folded.images[0]) - pixels(slot.images[0])).max() <= 1
    assert np.abs(pixels(folded.images[0]) - pixels(only_sid.images[0])).max() > 10


def test_batch_path_follows_the_rows_loras(service, loras, tmp_path):
    runs = service.adapters.runs
    sid = [concept(loras, "sid")]
    before = runs.copy()
    service.imagine_many([request(tmp_path, "s1", concepts=sid), request(tmp_path, "s2", seed=3, concepts=sid)])
    assert (runs["unet folded"], runs["unet slot"]) == (before["unet folded"] + 1, before["unet slot"])
    service.imagine_many([request(tmp_path, "m1", concepts=sid),
                          request(tmp_path, "m2", prompt="a photo of rex", concepts=[concept(loras, "rex", "dog")])])
    assert (runs["unet folded"], runs["unet slot"]) == (before["unet folded"] + 1, before["unet slot"] + 1)
    service.imagine_many([request(tmp_path, "w1", concepts=sid),
                          request(tmp_path, "w2", concepts=[concept(loras, "sid", weight=0.5)])])
    assert runs["unet slot"] == before["unet slot"] + 2  # same LoRA, other weight: rows differ
    assert runs["text_encoder folded"] == before["text_encoder folded"] + 5  # once per request, or per batch of
    # requests with the same LoRAs (s1 + s2, m1, m2, w1, w2)


def test_vae_decodes_one_image_at_a_time_and_keeps_its_setting(service, tmp_path):
    vae = service.pipe.vae
    decoded = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    try:
        service.imagine(request(tmp_path, "three", count=3, steps=1))
        assert decoded == [1, 1, 1] and not vae.use_slicing
        decoded.clear()
        vae.enable_slicing()  # someone else's setting is left as it was
        service.imagine(request(tmp_path, "two", count=2, steps=1))
        assert decoded == [1, 1] and vae.use_slicing
    finally:
        vae.disable_slicing()
        hook.remove()


def test_vae_decodes_the_whole_batch_where_the_gpu_has_room(service, tmp_path, monkeypatch):
    from trainer.training import memory

    asked = []
    monkeypatch.setattr(memory, "vae_decodes_whole_batches", lambda vae, images, pixels: asked.append((images, pixels))
                        or True)
    vae = service.pipe.vae
    decoded = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    try:
        service.imagine(request(tmp_path, "three", count=3, steps=1))
    finally:
        hook.remove()
    assert decoded == [3] and not vae.use_slicing and asked == [(3, 64 * 64)]


def test_images_are_the_bytes_diffusers_own_pil_output_gives():
    from diffusers.image_processor import VaeImageProcessor

    from trainer.generation.service import pil_images

    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 24).to(torch.bfloat16)
    images[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # halves round to even
    ours = pil_images(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [im.size for im in ours] == [(24, 16)] * 3 and all(im.mode == "RGB" for im in ours)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))


def test_training_right_after_generation_sees_the_base_weights(service, loras, tmp_path):
    from tests.trainer.training_helpers import make_spec, pipeline_state, write_solid_photos
    from trainer.training.engine import train_concept

    pipe = service.pipe
    saved = base_weights(pipe)
    service.imagine(request(tmp_path, "gen", concepts=[concept(loras, "sid")]))
    state = pipeline_state(pipe)
    at_first_step = []

    def on_progress(info):
        if not at_first_step:
            at_first_step.append(base_weights(pipe))

    spec = make_spec(write_solid_photos(tmp_path / "photos", 2), tmp_path / "out", steps=1)
    assert train_concept(pipe, spec, cache_dir=tmp_path / "cache", on_progress=on_progress).status == "done"
    assert all(torch.equal(at_first_step[0][k], saved[k]) for k in saved)
    assert_same_weights(pipe, saved)
    assert pipeline_state(pipe) == state
