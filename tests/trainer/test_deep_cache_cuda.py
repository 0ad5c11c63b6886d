"""The deep cache in CUDA graphs (trainer/generation/fast_unet.py `whole` / `head`): what the CPU tests
(test_deep_cache.py) cannot show. Needs a CUDA GPU (run on the lent H200); skipped elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer.test_generation import pixels, request
from trainer.generation.deep_cache import HEAD, WHOLE
from trainer.generation.service import GenerationService
from trainer.models.loading import load_pipeline


def test_graphs_serve_the_deep_cache_as_the_eager_parts_do(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200)")
    from trainer.models.tiny import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model", family="sd1"))
    graphed = GenerationService(load_pipeline(model, device="cuda", dtype="fp16"), model_name="tiny",
                                deep_cache_every=3)
    eager = GenerationService(load_pipeline(model, device="cuda", dtype="fp16"), model_name="tiny",
                              deep_cache_every=3, use_cuda_graphs=False)
    params = dict(prompt="a photo of a dog", steps=7, count=2)
    first = graphed.imagine(request(tmp_path, "graphed", **params))
    reference = eager.imagine(request(tmp_path, "eager", **params))
    for ours, theirs in zip(first.images, reference.images):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 2
    graphs = graphed.graphs
    assert sorted(entry.part for entry in graphs._graphs.values()) == [HEAD, WHOLE]
    assert graphs.replays == 7  # steps 0, 3 and 6 whole, the 4 others the head
    captures = graphs.captures
    again = graphed.imagine(request(tmp_path, "again", **params))
    assert graphs.captures == captures and graphs.replays == 14
    assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))  # the kept feature: this request's own
