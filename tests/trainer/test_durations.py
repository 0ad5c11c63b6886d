"""The one duration format (trainer.contract.durations): Discord messages, worker limits and the CLI's ETA."""
from __future__ import annotations

from trainer.contract.durations import format_duration


def test_durations_read_well():
    assert [format_duration(s) for s in (None, float("nan"), float("inf"), -1)] == ["?"] * 4
    assert format_duration(0) == "0 s" and format_duration(12.2) == "13 s" and format_duration(45) == "45 s"
    assert format_duration(75) == "1 min" and format_duration(150) == "3 min" and format_duration(300) == "5 min"
    assert format_duration(5 * 60 + 10) == "5 min" and format_duration(3599) == "1 h"
    assert format_duration(2 * 3600) == "2 h" and format_duration(2 * 3600 + 600) == "2 h 10 min"
    assert format_duration(3 * 3600 + 20 * 60) == "3 h 20 min"
