"""`python -m bench.class_image_pause --tiny`: the bench's code path on the CPU (the figures come from the GPU)."""
from __future__ import annotations

import json

from bench.class_image_pause import main


def test_the_pause_bench_pauses_mid_batch_and_finds_the_same_images(tmp_path):
    result = main(["--tiny", "--out", str(tmp_path / "pause.json")])
    assert result["identical_images"] is True
    assert result["pauses"] >= 2 and 0 <= result["wait_p50_s"] <= result["wait_max_s"]
    assert result["wait_max_s"] < result["batch_s"]  # one sampler step, not the rest of the batch
    assert json.loads((tmp_path / "pause.json").read_text()) == result
