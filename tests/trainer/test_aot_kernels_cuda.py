"""The forward compiled ahead of time inside a CUDA graph: what the CPU tests (test_aot_kernels.py) cannot show.
Needs a CUDA GPU (run on the lent H200: `python -m pytest tests/trainer/test_aot_kernels_cuda.py`, about a minute
for the tiny model's one shape); skipped elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer.test_generation import pixels
from tests.trainer.test_generation import request as full_request
from trainer.generation.service import GenerationService
from trainer.models.loading import load_pipeline

COMPILE_TIMEOUT_S = 600


def request(tmp_path, name, **params):
    return full_request(tmp_path, name, **{"steps": 4, "count": 1, **params})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_cuda_graph_replays_the_compiled_forward_and_serves_the_same_images(family, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200)")
    from trainer.models.tiny import make_tiny_model

    pipe = load_pipeline(str(make_tiny_model(tmp_path / "model", family=family)), device="cuda", dtype="fp16")
    service = GenerationService(pipe, model_name="tiny", aot_dir=tmp_path / "aot", max_batch_images=1)
    try:
        eager = service.imagine(request(tmp_path, "eager"))
        assert service.graphs.captures >= 1 and service.aot.compiles_started == 1
        service.aot.wait(COMPILE_TIMEOUT_S)
        assert service.graphs.adopt_compiled() == 1, service.aot.refused  # captured and checked against eager
        ahead_graphs = [entry for entry in service.graphs._graphs.values() if entry.ahead is not None]
        assert len(ahead_graphs) == 1
        replays = service.graphs.replays
        ahead = service.imagine(request(tmp_path, "ahead"))
        assert service.graphs.replays == replays + 4  # every step replayed the graph around the package
        difference = np.abs(pixels(eager.images[0]) - pixels(ahead.images[0]))
        assert difference.max() <= 8 and difference.mean() <= 1.0  # fp16 kernels of two kinds
    finally:
        service.stop_compiling()
