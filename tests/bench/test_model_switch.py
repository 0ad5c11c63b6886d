"""bench.model_switch in its small form (tiny models on the CPU): the GPU run's command works and reports what the
resident-model rules did."""
from __future__ import annotations

import json

from bench.model_switch import main


def test_the_model_switch_benchmark_reports_loads_switches_and_evictions(capsys, tmp_path):
    assert main(["--device", "cpu", "--size", "tiny", "--dtype", "fp32", "--models-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["families"] == {"sd1": "sd1", "sdxl": "sdxl"}
    assert set(report["cold_load_s"]) == {"sd1", "sdxl"}
    assert report["resident_after_keep_2"] == ["sdxl", "sd1"]  # least recently used first
    assert report["resident_after_keep_1"] == ["sdxl"]
    assert report["memory_rule"] is None  # measured on a GPU only
