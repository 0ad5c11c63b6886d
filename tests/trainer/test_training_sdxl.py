"""SDXL training on the tiny SDXL pipeline (two text encoders, pooled embeddings, size conditioning), CPU: both LoRA
files load with diffusers' own loader and change the UNet alike, kohya names are SDXL's (`lora_te1_`, `lora_te2_`,
original UNet blocks, `ss_base_model_version`), prior preservation and text-encoder LoRA on both encoders run, and the
shared pipeline is given back as found."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.training_helpers import make_spec, pipeline_state, write_noise_photos
from trainer.models.loading import load_pipeline
from trainer.training.engine import train_concept
from trainer.training.lora_files import read_metadata

KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def trained(tiny_sdxl_pipeline, tmp_path_factory):
    """One SDXL training with the default recipe's prior preservation and text-encoder LoRA."""
    root = tmp_path_factory.mktemp("sdxl-training")
    photos = write_noise_photos(root / "photos", 3)
    before = pipeline_state(tiny_sdxl_pipeline, extra=("text_encoder_2",))
    outcome = train_concept(tiny_sdxl_pipeline, make_spec(photos, root / "out", steps=3), cache_dir=root / "cache")
    assert outcome.status == "done"
    assert pipeline_state(tiny_sdxl_pipeline, extra=("text_encoder_2",)) == before
    return outcome.result


def test_the_diffusers_file_has_the_unet_and_both_text_encoders(trained, tiny_sdxl_model_dir):
    keys = list(load_file(trained["lora"]))
    assert any(k.startswith("unet.") and k.endswith("to_q.lora.down.weight") for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys)
    fresh = load_pipeline(str(tiny_sdxl_model_dir), device="cpu", dtype="fp32")
    fresh.load_lora_weights(trained["lora"], adapter_name="trained")
    assert fresh.get_list_adapters() == {"unet": ["trained"], "text_encoder": ["trained"],
                                         "text_encoder_2": ["trained"]}


def test_the_kohya_file_has_sdxl_names_and_metadata(trained, tiny_sdxl_pipeline):
    kohya = load_file(trained["lora_kohya"])
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:5]
    modules = {k.split(".")[0] for k in kohya}
    # The original SDXL block numbering kohya's sd-scripts and A1111 use (tiny UNet: one layer per block).
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0" in modules
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k" in modules
    assert not any("down_blocks" in m or "up_blocks" in m for m in modules)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in modules
    attention_projections = sum(1 for n, _ in tiny_sdxl_pipeline.unet.named_modules()
                                if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n))
    assert sum(m.startswith("lora_unet_") for m in modules) == attention_projections
    meta = read_metadata(trained["lora_kohya"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4"


def _unet_output(pipe):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, 64, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator),
             "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), hidden, added_cond_kwargs=added).sample


def _text_output(pipe, name):
    ids = pipe.tokenizer(["a photo of squidarth man"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]


def test_the_kohya_file_loaded_by_diffusers_changes_the_model_like_the_diffusers_file(trained, tiny_sdxl_model_dir):
    outputs = {}
    for name in ("base", "lora", "lora_kohya"):
        pipe = load_pipeline(str(tiny_sdxl_model_dir), device="cpu", dtype="fp32")
        if name != "base":
            pipe.load_lora_weights(trained[name], adapter_name="trained")
            assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
        outputs[name] = [_unet_output(pipe), _text_output(pipe, "text_encoder"), _text_output(pipe, "text_encoder_2")]
    for base, diffusers_file, kohya_file in zip(*outputs.values()):
        change = (diffusers_file - base).abs().max()
        assert change > 1e-4  # the LoRA does something...
        assert (kohya_file - diffusers_file).abs().max() < 0.01 * change  # ...and the kohya file the same (fp16)


def test_unet_only_training_without_prior_preservation(tiny_sdxl_pipeline, tmp_path):
    photos = write_noise_photos(tmp_path / "photos", 2)
    spec = make_spec(photos, tmp_path / "out", steps=2, train_text_encoder=False, prior_preservation=False)
    result = train_concept(tiny_sdxl_pipeline, spec, cache_dir=tmp_path / "cache").result
    assert {k.split(".")[0] for k in load_file(result["lora"])} == {"unet"}
    assert {k.split("_")[1] for k in load_file(result["lora_kohya"])} == {"unet"}
