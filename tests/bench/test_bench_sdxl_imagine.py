"""`python -m bench --family sdxl --only imagine,throughput,switch`: SDXL /imagine, ours against the plain
StableDiffusionXLPipeline, on the tiny SDXL model (the training half is tests/bench/test_sdxl_bench.py)."""
from __future__ import annotations

import json

from bench.__main__ import main


def test_tiny_sdxl_bench_measures_the_plain_sdxl_pipeline_and_ours(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["--tiny", "--family", "sdxl", "--only", "imagine,throughput,switch", "--json", str(out),
                 "--work-dir", str(tmp_path)])
    report = json.loads(out.read_text())
    assert code == 0, report["errors"]
    assert report["config"]["family"] == "sdxl" and report["config"]["sections"] == ["imagine", "throughput", "switch"]
    rows = {r["metric"]: r for r in report["rows"]}
    assert set(rows) == {"imagine_s", "throughput_ips", "switch_ms"}
    for metric, row in rows.items():
        assert row["reference"] > 0 and row["ours"] is not None and row["ours"] >= 0, metric
    assert report["results"]["ours"]["imagine_s"] > 0
