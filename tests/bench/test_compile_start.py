"""`python -m bench.compile_start` on the CPU: the code path of the GPU measurement (nothing is compiled off CUDA)."""
from __future__ import annotations

import json

from bench.compile_start import main


def test_compile_start_starts_the_worker_to_ready_and_reads_its_warm_up(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--device", "cpu", "--starts", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    (start,) = report["starts"]
    assert start["exit_status"] == 0 and start["ready_s"] > 0 and start["warm_up_s"] is not None
    assert report["inductor_cache_mb"] == 0.0  # the CPU worker compiles nothing
