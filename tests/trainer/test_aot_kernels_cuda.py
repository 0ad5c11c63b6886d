"""The forward compiled ahead of time inside a CUDA graph: what the CPU tests (test_aot_kernels.py) cannot show.
Needs a CUDA GPU (run on the lent H200: `python -m pytest tests/trainer/test_aot_kernels_cuda.py`; three compiles of
the tiny models' one shape, ~2 minutes each there); skipped elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer.test_generation import pixels
from tests.trainer.test_generation import request as full_request
from tests.trainer.training_helpers import make_spec, write_noise_photos
from trainer.generation.service import GenerationService
from trainer.models.loading import load_pipeline
from trainer.training.engine import train_concept
from trainer.training.live import LiveTrainings

COMPILE_TIMEOUT_S = 600


def request(tmp_path, name, **params):
    return full_request(tmp_path, name, **{"steps": 4, "count": 1, **params})


@pytest.fixture(scope="module")
def sd1_compiled(tmp_path_factory):
    """The tiny SD 1.x model with its /imagine shape compiled ahead of time, once for the tests that need it (a compile
    takes a minute or more); each test's service adopts the package from disk, as a restarted worker does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200)")
    from trainer.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sd1-compiled")
    model = make_tiny_model(root / "model", family="sd1")
    service = GenerationService(load_pipeline(str(model), device="cuda", dtype="fp16"), model_name="tiny",
                                aot_dir=root / "aot", max_batch_images=1)
    service.imagine(request(root, "eager"))
    service.aot.wait(COMPILE_TIMEOUT_S)
    service.stop_compiling()
    return model, root / "aot"


def compiled_service(compiled, live: LiveTrainings) -> GenerationService:
    """A service on the compiled model with the package adopted, beside the trainings `live` holds (as the worker
    makes it)."""
    model, aot_dir = compiled
    service = GenerationService(load_pipeline(str(model), device="cuda", dtype="fp16"), model_name="tiny",
                                aot_dir=aot_dir, max_batch_images=1, training_held=lambda: live.held is not None)
    assert service.aot.loader_ready.wait(COMPILE_TIMEOUT_S)
    assert service.graphs.adopt_compiled() == 1, service.aot.refused
    return service


def ahead_graphs(service) -> int:
    return sum(entry.ahead is not None for entry in service.graphs._graphs.values())


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


def test_the_compiled_forward_serves_again_after_a_training_that_yielded_to_imagine(sd1_compiled, tmp_path):
    """The worker's order: a training frees generation's graphs and yields while a member's /imagine runs beside it
    (adapters resident), goes on, ends (graphs freed again); the next idle moment captures the compiled forward's
    graph again. No request beside the held training captures a compiled forward, and the package is never
    refused."""
    live = LiveTrainings()
    service = compiled_service(sd1_compiled, live)
    try:
        pipe, released, asked = service.pipe, [], []
        spec = make_spec(write_noise_photos(tmp_path / "photos", 3), tmp_path / "lora", steps=6, resolution=64)

        def before_adapters() -> None:  # the worker's: generation's graphs go, the training's adapters come
            released.append(True)
            service.release_memory()

        def someone_waits_after_two_steps() -> bool:
            if released:
                asked.append(True)
            return len(asked) >= 3

        paused = train_concept(pipe, spec, cache_dir=tmp_path / "cache", live=live,
                               should_yield=someone_waits_after_two_steps, before_adapters=before_adapters)
        assert paused.status == "paused" and paused.step >= 1 and live.held is not None
        during = service.imagine(request(tmp_path, "during"))
        assert during.images and ahead_graphs(service) == 0  # the eager forward's graph, captured for the member
        done = train_concept(pipe, spec, cache_dir=tmp_path / "cache", live=live)
        assert done.status == "done" and live.held is None
        service.release_memory()  # as the worker does when a training ends

        service.graphs.adopt_compiled()  # the worker's idle moment captures it again
        assert ahead_graphs(service) == 1 and not service.aot.refused, service.aot.refused
        replays, calls = service.graphs.replays, service.aot.calls
        after = service.imagine(request(tmp_path, "after"))
        assert after.images and service.graphs.replays == replays + 4 and ahead_graphs(service) == 1
        assert service.aot.calls == calls  # replayed from the graph: the package is not called from Python

        service.release_memory()  # freed again, and a member comes before any idle moment: no training is held,
        busy = service.imagine(request(tmp_path, "busy"))  # so the request captures the compiled forward's graph
        assert busy.images and ahead_graphs(service) == 1 and not service.aot.refused
    finally:
        service.stop_compiling()


def test_with_room_to_keep_them_the_compiled_graph_replays_beside_a_held_training(sd1_compiled, tmp_path):
    """On a GPU that keeps generation's graphs through a training (trainer/training/memory.py), the training's adapters
    leave the weights where the graph reads them: an /imagine beside the held training and after it replays the
    compiled forward's graph captured before, capturing nothing, and makes the same image."""
    live = LiveTrainings()
    service = compiled_service(sd1_compiled, live)
    try:
        reference = pixels(service.imagine(request(tmp_path, "reference")).images[0])
        captures, added, asked = service.graphs.captures, [], []

        def someone_waits_after_two_steps() -> bool:
            if added:
                asked.append(True)
            return len(asked) >= 3

        spec = make_spec(write_noise_photos(tmp_path / "photos", 3), tmp_path / "lora", steps=6, resolution=64)
        paused = train_concept(service.pipe, spec, cache_dir=tmp_path / "cache", live=live,
                               should_yield=someone_waits_after_two_steps, before_adapters=lambda: added.append(1))
        assert paused.status == "paused" and live.held is not None
        during = pixels(service.imagine(request(tmp_path, "during")).images[0])
        assert service.graphs.captures == captures and ahead_graphs(service) == 1
        assert np.array_equal(during, reference)
        assert train_concept(service.pipe, spec, cache_dir=tmp_path / "cache", live=live).status == "done"
        after = pixels(service.imagine(request(tmp_path, "after")).images[0])
        assert service.graphs.captures == captures and np.array_equal(after, reference)
        assert not service.aot.refused
    finally:
        service.stop_compiling()
