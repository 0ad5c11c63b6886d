"""`python -m bench.burst --quick`: a burst of /imagine through the real bot process and worker (tiny model) against
the fake Discord. Correctness only (every command acknowledged and answered, every job's result posted exactly
once); the timings are figures for docs/BENCHMARKS.md, not assertions."""
from __future__ import annotations

import json

from bench.burst import main


def test_quick_burst_delivers_every_job_exactly_once(capsys):
    code = main(["--quick", "--json"])
    result = json.loads(capsys.readouterr().out)

    assert result["commands"] == 40 and result["members"] == 8
    assert result["acks_missing"] == 0 and result["followups_missing"] == 0
    assert result["queue_probe"]["count"] >= 1 and result["queue_probe"]["unanswered"] == 0
    delivery = result["delivery"]
    assert delivery["jobs"] == 40 and delivery["exactly_once"] == 40, delivery
    assert delivery["stray_posts"] == 0
    assert result["loop_lag"]["samples"] > 0  # the probe inside the bot process reported
    assert result["correct"] and code == 0
