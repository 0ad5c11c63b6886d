"""`python -m bench.imagine_fixed_cost --tiny`: the GPU measurement's code path on the CPU (the real worker's imagine
job at several step counts, then one under cProfile)."""
from __future__ import annotations

import json

from bench.imagine_fixed_cost import main


def test_it_times_the_worker_at_each_step_count_and_profiles_one_job(capsys):
    assert main(["--tiny", "--steps", "4", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["device"] == "cpu" and set(report["job_s"]) == {"1", "2", "4"}  # N/2 = 2
    assert all(s > 0 for s in report["job_s"].values()) and report["profiled_s"] > 0
    assert "fixed_s" in report and "per_step_s" in report
    assert "trainer/generation/service.py" in captured.err  # the worker's own path was profiled


def test_members_are_timed_as_one_batch(capsys):
    assert main(["--tiny", "--steps", "4", "--repeats", "1", "--members", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["members"] == 3 and all(s > 0 for s in report["job_s"].values())
