"""`python -m bot check` with several workers (BOOTHBOT_WORKERS): each one is started and reported on its own line;
Ray asked for without its extra is a clear problem."""
from __future__ import annotations

import io
from dataclasses import replace

import pytest

from bot.check import Report, check_worker, check_workers_setting
from bot.dispatch import workers as workers_module
from bot.dispatch.workers import build_workers
from bot.errors import SetupError
from bot.settings import Settings


async def test_gpu_check_starts_and_reports_every_configured_worker(tiny_model_dir, tmp_path):
    settings = replace(Settings(), model=str(tiny_model_dir), data_dir=tmp_path, dtype="fp32",
                       workers="local:cpu,cuda:1")  # this machine has no CUDA GPU: the second cannot start
    report = Report(out=io.StringIO())
    check_workers_setting(report, settings)
    await check_worker(report, settings)
    lines = [(status, text) for status, topic, text in report.lines if topic in ("worker", "workers")]
    assert lines[0] == ("ok", "BOOTHBOT_WORKERS=local:cpu,cuda:1: 2 local workers, one lane each (cpu, cuda:1)")
    first = [line for line in lines if line[1].startswith("worker 1 of 2 (cpu): ")]
    second = [line for line in lines if line[1].startswith("worker 2 of 2 (cuda:1): ")]
    assert [status for status, _ in first] == ["ok", "ok"], first
    assert "base model loaded on cpu" in first[0][1] and "matmuls on cpu" in first[1][1]
    assert len(second) == 1 and second[0][0] == "FAIL"
    assert "could not start: device cuda:1 was asked for but torch sees no CUDA GPU" in second[0][1]
    assert report.failed


async def test_ray_workers_without_ray_support_say_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(workers_module, "RAY_MODULE", "bot.dispatch.no_such_ray_workers")  # as before `.[ray]`
    settings = replace(Settings(), data_dir=tmp_path, workers="ray://10.0.0.5:10001")
    with pytest.raises(SetupError, match=r'BOOTHBOT_WORKERS=ray://10.0.0.5:10001 asks for Ray workers, which need '
                                         r'`pip install -e "\.\[ray\]"`'):
        await build_workers(settings)
    report = Report(out=io.StringIO())
    check_workers_setting(report, replace(settings, workers="auto"))
    assert report.lines == [("FAIL", "workers", workers_module.RAY_MISSING.format(value="auto"))]
