"""`python -m bench.compile_modes --tiny`: the code path of the GPU measurement on the CPU (no CUDA graphs there; `full`
does not compile off CUDA, `ahead` does): each mode in its own process, a cold run and one with the kept caches,
every figure reported."""
from __future__ import annotations

import json

from bench.compile_modes import main


def test_compile_modes_runs_each_mode_in_its_own_process_and_reports_every_figure(capsys):
    assert main(["--tiny", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(row["mode"], row["run"]) for row in report["rows"]] == [
        ("none", "cold"), ("full", "cold"), ("full", "kept cache"), ("ahead", "cold"), ("ahead", "kept cache")]
    for row in report["rows"]:
        assert row["first_imagine_s"] > 0 and row["imagine_p50_s"] > 0 and row["batch8_images_per_s"] > 0
        assert row["captures"] == 0  # no CUDA graphs on the CPU
    cold, kept = report["rows"][3:]
    # One image (2 rows with CFG), a batch of 8 (16 rows) and the same batch with members' concepts mixed through
    # the slot (planned from the first request): compiled by the other process, then loaded.
    assert cold["compiled_shapes"] == kept["compiled_shapes"] == 3 and not cold["refused"]
    assert cold["compile_process_s"] > 0 and kept["compile_process_s"] == 0.0  # a restart finds the packages
