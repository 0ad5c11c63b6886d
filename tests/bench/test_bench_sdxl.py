"""`python -m bench --family sdxl`: the SDXL-size builder and the /imagine sections on the tiny SDXL model."""
from __future__ import annotations

import json

import pytest

from bench.__main__ import main


def test_sdxl_builder_has_the_sdxl_base_architecture():
    from bench.sdxl import build_sdxl_pipeline

    pipe = build_sdxl_pipeline("meta")  # shapes only: no memory, no init time
    assert round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1) == 2567.5  # issue 13's "2,567.5 M"
    assert pipe.unet.config.cross_attention_dim == 2048 and pipe.unet.config.addition_embed_type == "text_time"
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (768, 1280)
    assert pipe.text_encoder_2.config.num_hidden_layers == 32 and pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 1024


def test_sdxl_bench_offers_the_imagine_sections_only():
    with pytest.raises(SystemExit, match="unknown section.*train.*--family sdxl"):
        main(["--tiny", "--family", "sdxl", "--only", "imagine,train"])


def test_tiny_sdxl_bench_measures_the_plain_sdxl_pipeline_and_ours(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["--tiny", "--family", "sdxl", "--json", str(out), "--work-dir", str(tmp_path)])
    report = json.loads(out.read_text())
    assert code == 0, report["errors"]
    assert report["config"]["family"] == "sdxl" and report["config"]["sections"] == ["imagine", "throughput", "switch"]
    rows = {r["metric"]: r for r in report["rows"]}
    assert set(rows) == {"imagine_s", "throughput_ips", "switch_ms"}
    for metric, row in rows.items():
        assert row["reference"] > 0 and row["ours"] is not None and row["ours"] >= 0, metric
    assert report["results"]["ours"]["imagine_s"] > 0
