"""Class images made before anyone asks: while the GPU is idle, the worker fills the shared class-image cache
(trainer/training/priors.py) for the classes the bot names (the ones its members train most, then a default set).

Each set is exactly the one a default training of that class would use (same prompt, resolution, count and recipe,
so the same cache key), made image by image: whatever stops it (`should_stop`: another request arrived) leaves whole
images behind and the batch it stopped between two sampler steps, and the next prefill or the training itself
finishes the set.
"""
from __future__ import annotations

from pathlib import Path

from trainer.contract.naming import class_kind
from trainer.contract.train_spec import spec_default
from trainer.training.priors import UnfinishedBatches


def uses_class_images(class_name: str) -> bool:
    """A default training of this class uses prior preservation (styles do not: TrainSpec.uses_prior)."""
    return class_kind(class_name) != "style"


def prefill_class_images(pipe, class_names, *, cache_dir: Path, count: int | None = None,
                         resolution: int | None = None, should_stop, on_image=None,
                         unfinished: UnfinishedBatches | None = None) -> bool:
    """Complete the class-image set of each class in order; True when all are complete, False when stopped.

    `should_stop()` is asked between two sampler steps too: a request waits one step, not a batch. The batch it
    stopped is kept in `unfinished` (the worker's, for the next prefill or training of that set): no step is made twice.
    """
    from trainer.training.engine import _native_resolution, class_prompt
    from trainer.training.lora_scope import LoraTrainingScope
    from trainer.training.priors import ClassImageSet, model_fingerprint

    count = count or spec_default("class_images")
    steps = spec_default("class_image_steps")
    resolution = resolution or _native_resolution(pipe)
    model_fp = model_fingerprint(pipe)
    batch = 8 if pipe.unet.device.type == "cuda" else 2
    with LoraTrainingScope(pipe, "prefill") as scope:  # no adapter is added: only "base model only, then as found"
        scope.base_model_only()
        for name in class_names:
            if not uses_class_images(name):
                continue
            if should_stop():
                return False
            class_set = ClassImageSet.for_model(Path(cache_dir), model_fp, class_prompt(name), resolution, count,
                                                steps)
            report = None if on_image is None else (lambda done, total, name=name: on_image(name, done, total))
            # Stopping here is a pause (kept in `unfinished`), not a cancel: nobody's job is given up.
            if class_set.ensure(pipe, batch_size=batch, deadline=None, should_stop=lambda: False,
                                should_yield=should_stop, on_image=report, unfinished=unfinished) != "complete":
                return False
    return True
