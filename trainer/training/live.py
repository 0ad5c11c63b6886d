"""A training kept resident between a yield and its resume, so that going on costs nothing.

When a training yields (someone waits for the GPU) the worker keeps its live state (LoRA adapters in the pipeline,
optimiser, captured CUDA graph, cached inputs) instead of rebuilding it from the checkpoint file at the next `run`.
Meanwhile its adapter is switched off and nothing of it is trainable (LoraTrainingScope.suspend), so /imagine jobs
in between generate exactly what they would without it. The checkpoint is still written at the yield: whoever
drops the held training (another training needs the memory, the generation service is created, the GPU went idle,
the worker exits) loses nothing, and the next `run` resumes from the file as before.

A training that yields while making its class images, between two sampler steps of a batch, leaves that batch in
`class_batches`, which a drop keeps: the next run, from memory or from the file, goes on with it (so does the
worker's idle prefill of the same set). Each run makes at least one sampler step, so a busy queue that drops the
training between runs cannot starve it.
"""
from __future__ import annotations

import logging

from trainer.training.priors import UnfinishedBatches

log = logging.getLogger(__name__)


class LiveTrainings:
    """At most one suspended training (the engine's _Slice), found again by its training's fingerprint, and the class
    images' paused batches."""

    def __init__(self):
        self._held = None
        self.class_batches = UnfinishedBatches()
        self.resumed = 0  # resumes served from memory (logs, tests)

    @property
    def held(self):
        return self._held

    def keep(self, training) -> None:
        if self._held is not None and self._held is not training:
            self.drop()
        self._held = training

    def take(self, fingerprint: str):
        """The held training if it is this one (it is no longer held), else None."""
        held = self._held
        if held is None or held.job.fingerprint != fingerprint:
            return None
        self._held = None
        self.resumed += 1
        return held

    def drop(self) -> None:
        """Give the held training's memory back; its checkpoint on disk stays for the next `run`."""
        held, self._held = self._held, None
        if held is not None:
            log.info("dropping the suspended training of %s; it resumes from its checkpoint", held.spec.concept_id)
            held.close()
