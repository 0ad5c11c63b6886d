"""Model families: detected from the model itself (folder, single file, hub cache), loaded with the right pipeline
class, reported in the worker's ready event; an architecture boothbot does not run is refused by name."""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from trainer.contract.errors import SetupError
from trainer.contract.families import FAMILIES, SD1, SDXL, UnknownFamily, family_named
from trainer.models.detection import UnsupportedModel, detect_family
from trainer.models.loading import resolve_model


def _safetensors(path, names):
    """A valid .safetensors file whose tensors have `names` (one float each): what detection reads is the header."""
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(1) for name in names}, str(path))
    return path


def test_families_name_their_sizes_and_kohya_version():
    assert family_named("sdxl") is SDXL and set(FAMILIES) == {"sd1", "sdxl"}
    assert SDXL.sizes[0] == (1024, 1024) and SDXL.offers(832, 1216) and not SDXL.offers(512, 512)
    assert SD1.sizes[0] == (512, 512) and SD1.base_model_version == "sd_v1"
    assert SDXL.base_model_version == "sdxl_base_v1-0"
    with pytest.raises(UnknownFamily, match="sd1, sdxl"):
        family_named("flux")


def test_tiny_folders_are_detected_by_their_components(tiny_model_dir, tiny_sdxl_model_dir):
    assert detect_family(resolve_model(str(tiny_model_dir))) is SD1
    assert detect_family(resolve_model(str(tiny_sdxl_model_dir))) is SDXL


@pytest.mark.parametrize("names, family", [
    (["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.ln_final.weight",
      "model.diffusion_model.input_blocks.0.0.weight"], SDXL),  # SDXL base, Pony, Illustrious
    (["cond_stage_model.transformer.text_model.x", "model.diffusion_model.input_blocks.0.0.weight"], SD1),
])
def test_single_files_are_detected_by_their_tensor_names(tmp_path, names, family):
    path = _safetensors(tmp_path / "renamed-to-say-nothing.safetensors", names)
    assert detect_family(resolve_model(str(path))) is family


@pytest.mark.parametrize("names, found", [
    (["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], "Stable Diffusion 2.x"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.x"], "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
    (["conditioner.embedders.0.model.ln_final.weight"], "SDXL refiner"),
    (["some.other.net.weight"], "unknown architecture"),
])
def test_an_unsupported_single_file_is_refused_naming_what_it_is(tmp_path, names, found):
    path = _safetensors(tmp_path / "model.safetensors", names)
    with pytest.raises(UnsupportedModel, match=found) as caught:
        detect_family(resolve_model(str(path)))
    assert "not supported yet" in str(caught.value) and "SDXL" in str(caught.value)
    assert isinstance(caught.value, SetupError)  # the worker and the CLI show it as one line, no traceback


def test_a_ckpt_is_detected_from_its_pickle_without_unpickling(tmp_path):
    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as archive:  # torch.save's layout: archive/data.pkl holds the tensor names
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00X\x1e\x00\x00\x00conditioner.embedders.1.model.x")
    assert detect_family(resolve_model(str(path))) is SDXL


def _folder(tmp_path, class_name, components, unet_config=None):
    folder = tmp_path / "model"
    folder.mkdir()
    index = {"_class_name": class_name, **{name: ["diffusers", "X"] for name in components}}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in components:
        (folder / name).mkdir()
    if unet_config:
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    return folder


@pytest.mark.parametrize("class_name, components, unet_config, found", [
    ("StableDiffusionPipeline", ("unet", "vae", "text_encoder", "tokenizer"), {"cross_attention_dim": 1024},
     "Stable Diffusion 2.x"),
    ("StableDiffusion3Pipeline", ("transformer", "vae", "text_encoder"), None, "Stable Diffusion 3"),
    ("FluxPipeline", ("transformer", "vae", "text_encoder"), None, "Flux"),
    ("StableDiffusionXLImg2ImgPipeline", ("unet", "vae", "text_encoder_2"), None, "SDXL refiner"),
])
def test_an_unsupported_folder_is_refused_naming_what_it_is(tmp_path, class_name, components, unet_config, found):
    folder = _folder(tmp_path, class_name, components, unet_config)
    with pytest.raises(UnsupportedModel, match=found):
        detect_family(resolve_model(str(folder)))


def test_a_hub_id_is_detected_from_its_cached_model_index(tmp_path, monkeypatch, tiny_sdxl_model_dir):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--any-name"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_sdxl_model_dir / "model_index.json", snapshot / "model_index.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    source = resolve_model("someone/any-name")
    assert source.kind == "hub" and source.cached
    assert detect_family(source) is SDXL


def test_loading_an_unsupported_model_says_so_before_loading_anything(tmp_path):
    from trainer.models.loading import load_pipeline

    path = _safetensors(tmp_path / "flux1-dev.safetensors", ["double_blocks.0.img_attn.qkv.weight"])
    with pytest.raises(UnsupportedModel, match="Flux model, which is not supported yet"):
        load_pipeline(str(path), device="cpu", dtype="fp32")


def test_the_tiny_sdxl_loads_as_an_sdxl_pipeline_with_two_encoders(tiny_sdxl_pipeline, tiny_pipeline):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.models.family import family_of

    assert isinstance(tiny_sdxl_pipeline, StableDiffusionXLPipeline)
    assert isinstance(tiny_pipeline, StableDiffusionPipeline)
    assert family_of(tiny_sdxl_pipeline).text_encoders == ("text_encoder", "text_encoder_2")
    assert family_of(tiny_pipeline).name == "sd1"
    assert tiny_sdxl_pipeline.unet.config.addition_embed_type == "text_time"
    assert not any(p.requires_grad for p in tiny_sdxl_pipeline.text_encoder_2.parameters())


def test_the_tiny_sdxl_generates_an_image(tiny_sdxl_pipeline):
    import torch

    with torch.no_grad():
        image = tiny_sdxl_pipeline("a photo of a dog", num_inference_steps=2, height=64, width=64,
                                   generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_make_tiny_model_cli_writes_an_sdxl_folder(tmp_path, capsys):
    from trainer.__main__ import main

    assert main(["make-tiny-model", "--family", "sdxl", str(tmp_path / "xl")]) == 0
    assert "tiny SDXL pipeline written to" in capsys.readouterr().out
    assert detect_family(resolve_model(str(tmp_path / "xl"))) is SDXL


def test_the_worker_reports_the_family_in_its_ready_event(tiny_sdxl_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    command = [sys.executable, "-m", "trainer", "worker", "--model", str(tiny_sdxl_model_dir), "--device", "cpu",
               "--threads", "1", "--data-dir", str(tmp_path)]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as worker:
        ready = json.loads(worker.stdout.readline())
        worker.stdin.close()  # the bot went away: the worker exits
        worker.wait(timeout=60)
    assert (ready["event"], ready["family"], ready["native_side"]) == ("ready", "sdxl", 64)


def test_sdxl_vae_works_in_fp32_while_fp16_would_overflow_and_is_given_back():
    import torch

    from trainer.models.family import vae_precision
    from trainer.models.tiny import build_tiny_pipeline

    sdxl, sd1 = build_tiny_pipeline(family="sdxl"), build_tiny_pipeline()
    for pipe in (sdxl, sd1):
        pipe.vae.to(torch.float16)
    with vae_precision(sdxl) as vae:
        assert vae.dtype == torch.float32
    assert sdxl.vae.dtype == torch.float16
    with vae_precision(sd1) as vae:  # SD 1.x's VAE is fine in fp16
        assert vae.dtype == torch.float16
    sdxl.vae.to(torch.bfloat16)  # bf16 has fp32's range: no upcast
    with vae_precision(sdxl) as vae:
        assert vae.dtype == torch.bfloat16
