"""The default recipe at a bigger batch (trainer/training/engine.py `recipe_at_batch`): a third of the samples in far
fewer steps at higher learning rates, chosen by the worker from the GPU (trainer/training/memory.py
`default_batch_for`) only for a job that sets none of the recipe's speed fields."""
from __future__ import annotations

import pytest

from trainer.contract import protocol
from trainer.contract.train_spec import TrainSpec
from trainer.training import memory
from trainer.training.engine import recipe_at_batch
from trainer.worker import EventWriter, JobControl, Worker

from tests.trainer.test_worker_run_many import Events
from tests.trainer.training_helpers import write_noise_photos


def _spec(tmp_path, class_name: str, photos: int) -> TrainSpec:
    return TrainSpec(concept_id="c", token="squidarth", class_name=class_name,
                     photos_dir=write_noise_photos(tmp_path / f"photos-{class_name}", photos), out_dir=tmp_path / "out")


@pytest.mark.parametrize(("class_name", "photos", "steps_at_batch_1"), [("man", 5, 800), ("dog", 5, 500),
                                                                         ("dog", 13, 1300)])
def test_a_bigger_batch_sees_a_third_of_the_samples_at_higher_learning_rates(tmp_path, class_name, photos,
                                                                              steps_at_batch_1):
    spec = _spec(tmp_path, class_name, photos)
    at_4 = recipe_at_batch(spec, 4)
    assert (at_4.batch_size, at_4.steps) == (4, -(-steps_at_batch_1 // 12))  # 800 -> 67, 500 -> 42, 1300 -> 109
    assert at_4.learning_rate == pytest.approx(12 * spec.learning_rate)
    assert at_4.text_encoder_learning_rate == pytest.approx(12 * spec.text_encoder_learning_rate)
    assert at_4.fingerprint_fields() != spec.fingerprint_fields()  # a checkpoint of the other recipe is not resumed
    assert recipe_at_batch(spec, 1) is spec


def test_the_default_batch_stays_1_off_a_cuda_gpu_and_in_the_low_memory_setting(tiny_pipeline):
    assert memory.default_batch_for("auto", tiny_pipeline) == 1
    assert memory.default_batch_for("low", tiny_pipeline) == 1
    with pytest.raises(ValueError, match="unknown training memory setting"):
        memory.default_batch_for("huge", tiny_pipeline)


def _paused_training(worker, control, events, params) -> dict:
    """Runs the job until its first yield (someone waits) and returns the `paused` event."""
    message = protocol.run(1, "train", params)
    control.register(message)
    control.request_yield(1)
    try:
        worker.run_job(1, "train", params)
    finally:
        control.ended(1)
    assert events.events[-1]["event"] == "paused"
    return events.events[-1]


@pytest.mark.parametrize("given", [{}, {"steps": 3}, {"batch_size": 2}, {"learning_rate": 3e-4}])
def test_the_worker_trains_its_gpus_default_batch_only_when_the_job_sets_none_of_the_recipes_speed_fields(
        tiny_pipeline, tiny_model_dir, tmp_path, monkeypatch, given):
    monkeypatch.setattr(memory, "default_batch_for", lambda mode, pipe: 4)  # as on a GPU with room for it
    events, control = Events(), JobControl()
    control.loading = False
    worker = Worker(EventWriter(events), control, pipe=tiny_pipeline, device="cpu", model=str(tiny_model_dir),
                    data_dir=tmp_path)
    params = {"concept_id": "c1", "token": "squidarth", "class_name": "man", "seed": 7, "resolution": 32,
              "class_images": 4, "sample_count": 0, "rank": 4, "photos_dir": str(write_noise_photos(tmp_path / "p", 2)),
              "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), **given}
    paused = _paused_training(worker, control, events, params)
    spec = worker.live.held.spec
    if given:
        assert paused["total"] == given.get("steps", 800)  # 2 photos of a man: 800 steps at the given batch
        assert spec.batch_size == given.get("batch_size", 1)
        assert spec.learning_rate == given.get("learning_rate", 1e-4)
    else:
        assert paused["total"] == 67
        assert spec.batch_size == 4
        assert (spec.learning_rate, spec.text_encoder_learning_rate) == pytest.approx((1.2e-3, 6e-4))
