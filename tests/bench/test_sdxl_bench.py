"""`python -m bench --family sdxl`: the SDXL-size builder's architecture, and every section on --tiny (CPU)."""
from __future__ import annotations

import json

from bench.__main__ import main


def test_sdxl_builder_has_the_architecture_of_the_issue_figures():
    from bench.sdxl import build_sdxl_pipeline

    pipe = build_sdxl_pipeline("meta")  # shapes only
    assert round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1) == 2567.5  # "UNet 2,567.5 M parameters"
    assert pipe.unet.config.cross_attention_dim == 2048 and pipe.unet.config.addition_embed_type == "text_time"
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (768, 1280)
    assert pipe.text_encoder_2.config.num_hidden_layers == 32 and pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 1024


def test_tiny_sdxl_bench_runs_reference_ours_and_memory(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--family", "sdxl", "--tiny", "--json", str(out), "--work-dir", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["errors"] == {} and report["family"] == "sdxl"
    assert report["reference"]["steps"] == 2 and report["reference"]["class_images_generated"] == 2
    assert report["ours"]["train_cold"]["steps"] == 2
    assert {"low", "fast"} <= set(report["memory"]) and report["memory"]["low"]["steps"] == 2
