"""`python -m bench`: the SD 1.5 builder, the reference loop, the report, and the whole bench on --tiny."""
from __future__ import annotations

import json

import pytest

from bench.__main__ import main
from bench.report import comparison_rows, format_table


def test_sd15_builder_has_the_architecture_benchmarks_md_pins_down():
    from bench.sd15 import build_sd15_pipeline

    pipe = build_sd15_pipeline("meta")  # shapes only: no memory, no init time
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964  # "UNet 859.5 M params"
    assert pipe.unet.config.cross_attention_dim == 768
    assert tuple(pipe.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert tuple(pipe.vae.config.block_out_channels) == (128, 256, 512, 512) and pipe.vae.config.latent_channels == 4
    text = pipe.text_encoder.config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.max_position_embeddings, text.hidden_act) == (
        49408, 768, 3072, 12, 12, 77, "quick_gelu")
    assert len(pipe.tokenizer) == 49408
    ids = pipe.tokenizer("a photo of man").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 6  # BOS, four whole words, EOS
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 512


def test_reference_training_saves_a_lora_the_plain_pipeline_loads(tmp_path):
    import torch

    from bench.fixtures import write_photos
    from bench.reference import ReferenceTrainConfig, reference_train
    from trainer.models.tiny import build_tiny_pipeline

    model_dir = tmp_path / "model"
    build_tiny_pipeline().save_pretrained(str(model_dir))
    photos = tmp_path / "photos"
    write_photos(photos, 3, 64)
    phases = reference_train(ReferenceTrainConfig(
        model_dir=model_dir, photos_dir=photos, work_dir=tmp_path / "ref", device="cpu", mixed_precision="no",
        resolution=64, max_train_steps=2, num_class_images=2, class_inference_steps=1))

    assert phases["steps"] == 2 and phases["class_images_generated"] == 2
    assert len(list((tmp_path / "ref" / "class_images").glob("*.jpg"))) == 2
    parts = sum(phases[k] for k in ("class_images_s", "load_s", "setup_s", "loop_s", "save_s"))
    assert phases["total_s"] == pytest.approx(parts, rel=1e-6)
    from safetensors import safe_open

    with safe_open(phases["lora"], framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)

    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(phases["lora"])  # the format diffusers' own loader reads
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert torch.isfinite(torch.tensor(phases["final_loss"]))


def test_rows_compute_ratio_in_the_direction_that_reads_as_speedup():
    rows = {r["metric"]: r for r in comparison_rows({
        "train_s": {"reference": 120.0, "ours": 12.0},
        "throughput_ips": {"reference": 1.0, "ours": 12.0},
        "switch_ms": {"reference": 300.0, "ours": None, "note": "engine missing"},
    })}
    assert rows["train_s"]["ratio"] == pytest.approx(10.0) and rows["train_s"]["met"] is False  # 12 s > 10 s goal
    assert rows["throughput_ips"]["ratio"] == pytest.approx(12.0) and rows["throughput_ips"]["met"] is True
    assert rows["switch_ms"]["ratio"] is None and rows["switch_ms"]["met"] is None
    table = format_table({"environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-22", "torch": "2.11",
                                          "diffusers": "0.42.1"},
                          "config": {"model": "random SD 1.5"}, "rows": list(rows.values()), "errors": {}})
    assert "NVIDIA H100 80GB HBM3" in table and "10.00x" in table and "NO" in table and "engine missing" in table


def test_sdxl_rows_are_judged_by_the_sdxl_goals():
    metrics = {"imagine_s": {"reference": 4.7, "ours": 0.9}, "throughput_ips": {"reference": 0.2, "ours": 1.0}}
    sd1 = {r["metric"]: r for r in comparison_rows(metrics)}
    sdxl = {r["metric"]: r for r in comparison_rows(metrics, "sdxl")}
    assert sd1["imagine_s"]["met"] is False and sdxl["imagine_s"]["met"] is True  # 0.25 s at 512², 1.0 s at 1024²
    assert sdxl["imagine_s"]["goal_reads"] == "<= 1"
    assert sdxl["throughput_ips"]["met"] is None and sdxl["throughput_ips"]["goal_reads"] == "-"  # no goal set


def test_bench_rejects_unknown_sections_and_full_size_on_cpu():
    with pytest.raises(SystemExit, match="unknown section.*bogus"):
        main(["--tiny", "--only", "imagine,bogus"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--tiny"):
        main(["--device", "cpu"])


def test_tiny_bench_measures_reference_and_ours_in_one_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--tiny", "--json", str(out), "--work-dir", str(tmp_path)])
    report = json.loads(out.read_text())
    assert code == 0, report["errors"]
    printed = capsys.readouterr().out
    env = report["environment"]
    assert env["gpu"].startswith("none (cpu") and env["date"] and env["torch"] and env["diffusers"]
    assert env["gpu"] in printed and "reference" in printed and "ours" in printed

    rows = {r["metric"]: r for r in report["rows"]}
    assert set(rows) >= {"train_s", "imagine_s", "throughput_ips", "switch_ms"}
    for metric, row in rows.items():
        assert row["reference"] > 0, metric
    for metric in ("train_s", "imagine_s", "throughput_ips", "switch_ms"):
        row = rows[metric]
        assert row["ours"] is not None and row["ours"] >= 0, metric
        if row["ours"] > 0:
            assert row["ratio"] > 0

    results = report["results"]
    assert results["reference_train"]["steps"] == report["config"]["steps"]
    assert results["reference_train"]["class_images_generated"] == report["config"]["class_images"]
    cold = results["ours"]["train_cold"]
    assert cold["steps"] == report["config"]["ours_steps"] and cold["slices"] == 1
    assert 0 < cold["lora_saved_s"] <= cold["seconds"] + 0.05
    # throughput as production serves a queue
    assert results["ours"]["throughput_mode"].startswith("one run_many request of 2 /imagine jobs")
    assert rows["throughput_ips"]["note"] == results["ours"]["throughput_mode"]
    profile = results["profile"]["generation"]
    assert profile["unet_cfg_step_ms"] > 0 and profile["full_call_1_active_ms"] > 0 and profile["fuse_lora_ms"] > 0
    assert results["profile"]["train_step"]["step_pairs1_ms"] > 0
