"""Class images made while the GPU is idle (`prefill`), in-process on the tiny model with the real Worker and
JobControl: the sets a default training would use get made, a member's request stops it at the next sampler step,
and the next prefill finishes a half-made set (and the batch it stopped in) without making anything again."""
from __future__ import annotations

from trainer.contract import protocol
from trainer.training.engine import class_prompt, train_concept
from trainer.training.priors import ClassImageSet, model_fingerprint
from trainer.worker import EventWriter, JobControl, Worker

from tests.trainer.test_training_yield import _pixels
from tests.trainer.test_worker_run_many import Events
from tests.trainer.training_helpers import CLASS_STEPS, make_spec, write_noise_photos

COUNT, SIDE = 4, 32  # 2 batches of 2 images (CPU) per class


def _set(pipe, cache, name) -> ClassImageSet:
    return ClassImageSet.for_model(cache, model_fingerprint(pipe), class_prompt(name), SIDE, COUNT, CLASS_STEPS)


def test_prefill_fills_the_class_cache_when_idle_and_stops_for_a_members_job(tiny_pipeline, tiny_model_dir, tmp_path):
    events, control = Events(), JobControl()
    control.loading = False
    worker = Worker(EventWriter(events), control, pipe=tiny_pipeline, device="cpu", model=str(tiny_model_dir),
                    data_dir=tmp_path)
    cache = tmp_path / "cache"
    member_job = protocol.run(7, "selftest", {"seconds": 0.01, "step_s": 0.01})
    unet_calls = []  # one per sampler step (the guidance's two halves run as one batch)

    def a_member_submits_during_the_second_batch(module, args, output):
        unet_calls.append(True)
        if len(unet_calls) == CLASS_STEPS + 5:
            control.submit(member_job)

    hook = tiny_pipeline.unet.register_forward_hook(a_member_submits_during_the_second_batch)
    try:
        worker.prefill(protocol.prefill(["man", "style", "dog"], count=COUNT, resolution=SIDE))
        assert events.events[-1] == protocol.prefill_state("stopped")
        man, dog = _set(tiny_pipeline, cache, "man"), _set(tiny_pipeline, cache, "dog")
        assert man.missing() == [2, 3] and dog.missing() == list(range(COUNT))
        assert worker.live.class_batches.step(man.directory) == f"5/{CLASS_STEPS}"  # the member waited one step
        assert control.jobs.get_nowait() == member_job  # the member's job is next, untouched
        control.ended(7)
        made_first = {i: man.image_path(i).stat().st_mtime_ns for i in (0, 1)}

        worker.prefill(protocol.prefill(["man", "style", "dog"], count=COUNT, resolution=SIDE))
    finally:
        hook.remove()
    assert events.events[-1] == protocol.prefill_state("complete")
    assert man.complete and dog.complete
    assert {i: man.image_path(i).stat().st_mtime_ns for i in (0, 1)} == made_first  # resumed, not made again
    assert len(unet_calls) == 4 * CLASS_STEPS  # two sets of two batches: the stopped batch went on at its step 5
    assert {e["class_name"] for e in events.events if e.get("state") == "progress"} == {"man", "dog"}  # styles: none
    uninterrupted = ClassImageSet.for_model(tmp_path / "uninterrupted", model_fingerprint(tiny_pipeline),
                                            class_prompt("man"), SIDE, COUNT, CLASS_STEPS)
    assert uninterrupted.ensure(tiny_pipeline, batch_size=2, deadline=None, should_stop=lambda: False) == "complete"
    assert all(_pixels(man.image_path(i)).tolist() == _pixels(uninterrupted.image_path(i)).tolist()
               for i in range(COUNT))

    # A training of that class then makes no class images of its own.
    photos = write_noise_photos(tmp_path / "photos", 2)
    stages = []
    done = train_concept(tiny_pipeline, make_spec(photos, tmp_path / "out", steps=1, sample_count=0,
                                                  class_images=COUNT, resolution=SIDE),
                         cache_dir=cache, on_progress=lambda info: stages.append(info.stage))
    assert done.status == "done" and "class_images" not in stages


def test_an_idle_worker_removes_the_class_images_no_training_used_for_a_month(tiny_pipeline, tiny_model_dir,
                                                                              tmp_path, capfd):
    """Sets of a class nobody trains any more, or made by an earlier recipe, do not stay on disk for good: the worker
    removes them when it is idle, and keeps the ones a training read lately however old they are."""
    import os
    import time

    from trainer.training.priors import UNUSED_DAYS

    cache = tmp_path / "cache"
    used, unused, unfinished = (_set(tiny_pipeline, cache, name) for name in ("man", "dog", "cat"))
    for complete in (used, unused):
        assert complete.ensure(tiny_pipeline, batch_size=2, deadline=None, should_stop=lambda: False) == "complete"
    assert unfinished.ensure(tiny_pipeline, batch_size=2, deadline=None, should_stop=lambda: False,
                             should_yield=lambda: True) == "paused"  # one batch of two images, then nothing
    long_ago = time.time() - (UNUSED_DAYS + 1) * 86400
    for directory in (used.directory, unused.directory, unfinished.directory):
        for path in [directory, *directory.rglob("*")]:
            os.utime(path, (long_ago, long_ago))
    used.latents()  # a training read it today

    worker = Worker(EventWriter(Events()), JobControl(), pipe=tiny_pipeline, device="cpu", model=str(tiny_model_dir),
                    data_dir=tmp_path)
    worker.prefill(protocol.prefill(["style"], count=COUNT, resolution=SIDE))  # idle; styles need no class images
    assert used.complete and not unused.directory.exists() and not unfinished.directory.exists()
    log = capfd.readouterr().err
    assert f"removed the class images in {unused.directory.name}: unused for {UNUSED_DAYS} days" in log
