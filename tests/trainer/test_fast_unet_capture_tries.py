"""A compiled forward whose CUDA graph fails to capture now and then (trainer/generation/fast_unet.py): the eager
forward serves that request, and the package is refused only after MAX_CAPTURE_TRIES failures in a row, so a worker
that runs for weeks does not lose its compiled forward to a few failures spread over them. A CPU has no graphs: the
capture itself is stood in for here; the real one is tests/trainer/test_aot_kernels_cuda.py's."""
from __future__ import annotations

import torch

from trainer.generation.aot_shapes import ForwardShape
from trainer.generation.deep_cache import WHOLE
from trainer.generation.fast_unet import MAX_CAPTURE_TRIES, UNetGraphs


class Refusals:
    """What UNetGraphs asks of the compiled forwards when a capture keeps failing."""

    def __init__(self):
        self.refused: dict[str, str] = {}

    def refuse(self, name: str, why: str) -> None:
        self.refused[name] = why


def test_a_package_is_refused_only_after_failed_captures_in_a_row(tiny_pipeline, monkeypatch):
    aot = Refusals()
    graphs = UNetGraphs(tiny_pipeline.unet, aot=aot)
    package, outcomes = object(), []  # each capture of the package: True captured, False failed

    def capture_with(key, part, static, shape, ahead):
        if ahead is None:
            return "eager graph"
        if not outcomes.pop(0):
            raise RuntimeError("operation not permitted when stream is capturing")
        return "compiled graph"

    monkeypatch.setattr(graphs, "_compiled_ahead", lambda *inputs: package)
    monkeypatch.setattr(graphs, "_capture_with", capture_with)
    sample, hidden = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)

    def capture() -> str:
        return graphs._capture(("key",), WHOLE, sample, torch.tensor(1.0), hidden, {}, None)

    name = ForwardShape.of(sample, torch.tensor(1.0), hidden, {}).name
    outcomes += [False] * (MAX_CAPTURE_TRIES - 1) + [True]
    expected = ["eager graph"] * (MAX_CAPTURE_TRIES - 1) + ["compiled graph"]
    assert [capture() for _ in range(MAX_CAPTURE_TRIES)] == expected
    outcomes += [False] * (MAX_CAPTURE_TRIES - 1)
    assert [capture() for _ in range(MAX_CAPTURE_TRIES - 1)] == ["eager graph"] * (MAX_CAPTURE_TRIES - 1)
    assert not aot.refused  # never MAX_CAPTURE_TRIES in a row
    outcomes.append(False)
    assert capture() == "eager graph" and name in aot.refused
    assert f"({MAX_CAPTURE_TRIES} tries)" in aot.refused[name]
