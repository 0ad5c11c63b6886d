"""Image files without a model: A1111 parameters text, small copies, grids, hashes, previews."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.contract.imagine_request import SCHEDULERS
from trainer.generation.pnginfo import (format_parameters, grid_shape, lora_hash, make_grid, model_hash, parse_parameters,
                             read_exif_parameters, read_png_parameters, save_png, small_copy)
from trainer.generation.previews import latents_to_images, save_preview
from trainer.generation.schedulers import SCHEDULERS as BUILT_SCHEDULERS


def test_parses_text_written_by_a1111():
    text = ("masterpiece, portrait\nof a knight\nNegative prompt: lowres, bad anatomy\n"
            'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: 6ce0161689, '
            'Model: v1-5-pruned-emaonly, Lora hashes: "sid: abcdef123456, rex: 0123456789ab", Version: v1.6.0')
    info = parse_parameters(text)
    assert info["Prompt"] == "masterpiece, portrait\nof a knight"
    assert info["Negative prompt"] == "lowres, bad anatomy"
    assert info["Size"] == "512x768" and info["Model hash"] == "6ce0161689" and info["Version"] == "v1.6.0"
    assert info["Lora hashes"] == "sid: abcdef123456, rex: 0123456789ab"


def test_format_quotes_values_like_a1111_and_round_trips():
    fields = {"Steps": 30, "Sampler": "Euler a", "CFG scale": "7.5", "Seed": 9, "Size": "512x512",
              "Model": "my, model: v2", "Denoising strength": None, "Job id": 4}
    text = format_parameters("a cat, sitting", "", fields)
    assert text.splitlines()[-1] == ('Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 9, Size: 512x512, '
                                     'Model: "my, model: v2", Job id: 4')
    info = parse_parameters(text)
    assert info == {"Prompt": "a cat, sitting", "Negative prompt": "", "Steps": "30", "Sampler": "Euler a",
                    "CFG scale": "7.5", "Seed": "9", "Size": "512x512", "Model": "my, model: v2", "Job id": "4"}


def test_png_chunk_and_small_copy_carry_the_text(tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 256)[None, :, None] + rng.integers(0, 40, (256, 256, 3))
    image = Image.fromarray(ramp.astype(np.uint8))
    png = save_png(image, tmp_path / "000.png", "a photo\nSteps: 1, Sampler: DDIM, CFG scale: 7, Seed: 1")
    assert read_png_parameters(png).startswith("a photo\n") and not list(tmp_path.glob(".*.tmp"))
    small = small_copy(image, 20_000, tmp_path / "000.small.webp", "a photo\nSteps: 1, Seed: 1, Size: 8x8")
    assert small.stat().st_size <= 20_000 < png.stat().st_size
    assert read_exif_parameters(small) == "a photo\nSteps: 1, Seed: 1, Size: 8x8"
    shrunk = small_copy(image, 1_500, tmp_path / "tiny.webp")  # too small for any quality at full size
    with Image.open(shrunk) as copy:
        assert copy.width < 256 and shrunk.stat().st_size <= 1_500
    assert small_copy(image, 10, tmp_path / "never.webp") is None


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("text", ["a photo of sid man\nSteps: 30, Seed: 1", "ein Foto: Größe\nSeed: 2",
                                  "a 🐱 in Tōkyō 東京\nNegative prompt: blur\nSeed: 3"])
def test_png_keeps_pixels_and_any_text_exactly(tmp_path, mode, text):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA").convert(mode)
    png = save_png(image, tmp_path / "x.png", text)
    assert read_png_parameters(png) == text
    with Image.open(png) as back:
        back.load()
        assert back.format == "PNG" and back.mode == mode
        assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("count, shape", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2))])
def test_grid_shapes(count, shape):
    assert grid_shape(count) == shape
    grid = make_grid([Image.new("RGB", (8, 6), "red")] * count)
    assert grid.size == (shape[1] * 8, shape[0] * 6)


def test_lora_hash_ignores_the_header_like_a1111(tmp_path):
    from safetensors.torch import save_file

    tensors = {"unet.x.lora_A.weight": torch.ones(2, 3)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"boothbot.token": "sid"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"boothbot.token": "someone else"})
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "c.safetensors")
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors")
    assert lora_hash(tmp_path / "a.safetensors") != lora_hash(tmp_path / "c.safetensors")
    assert len(lora_hash(tmp_path / "a.safetensors")) == 12


def test_model_hash_for_a_file_a_directory_and_a_hub_blob(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    assert model_hash(checkpoint) == hashlib.sha256(b"weights").hexdigest()[:10]
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet")
    assert model_hash(tmp_path / "pipe") == hashlib.sha256(b"unet").hexdigest()[:10]
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"not read")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "m.safetensors").symlink_to(blob)
    assert model_hash(tmp_path / "snap" / "m.safetensors") == "ab" * 5
    assert model_hash("some/hub-id") is None


def test_preview_from_latents(tmp_path):
    latents = torch.zeros(2, 4, 8, 8)
    latents[:, 3] = -2.0  # the 4th SD latent channel pushes towards blue
    images = latents_to_images(latents, scale=4)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    r, g, b = np.asarray(images[0], dtype=int)[0, 0]
    assert b > r and b > g
    path = save_preview(latents, tmp_path / "previews" / "3.webp")
    with Image.open(path) as image:
        assert image.format == "WEBP" and image.size == (64, 32)


def test_scheduler_names_match_what_requests_accept():
    assert tuple(BUILT_SCHEDULERS) == SCHEDULERS
