"""The crash checkpoint of a running training, written every `interval_s` seconds without stopping the steps.

A training no longer pauses at fixed times to save itself (it pauses only when someone waits: a `yield`), so a killed
worker or bot would lose everything since the start. Instead, at a step boundary, every tensor of the training state
(LoRA weights, optimiser moments, step counters) is cloned on its device: a few small copies queued behind the
running steps, no wait for the GPU. A background thread then copies the clones to the host and writes the checkpoint
file (trainer/training/checkpoint.py, renamed into place). At most one periodic write is in flight; a due
checkpoint waits for the next boundary after it. A killed process loses at most about one interval of steps.

The checkpoint a training writes when it yields goes through here too, queued behind a write in flight rather than
waiting for it: the member whose /imagine made it yield does not wait for a disk write, and the files still land in
the order they were taken.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from trainer.training import checkpoint

log = logging.getLogger(__name__)


def _map_tensors(value, fn):
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


class PeriodicCheckpoint:
    def __init__(self, out_dir: Path, interval_s: float | None):
        self.out_dir = Path(out_dir)
        self.interval_s = interval_s if interval_s is not None and interval_s >= 0 else None  # None: off; 0: every step
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None
        self.written = 0  # checkpoints written by this object (logs, tests)
        self.last_stamp: tuple[int, int] | None = None  # checkpoint.stamp of the last file this object wrote
        self.failed = False  # whether the last write that ended failed

    def due(self) -> bool:
        if self.interval_s is None or (self._thread is not None and self._thread.is_alive()):
            return False
        return time.monotonic() - self._last >= self.interval_s

    def save_async(self, state: dict) -> None:
        """Write `state` in the background, after the write in flight if any (this call does not wait for it); its
        tensors may be live training tensors (they are cloned here)."""
        snapshot = _map_tensors(state, lambda t: t.detach().clone())
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._write, args=(snapshot, self._thread), name="train-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _write(self, snapshot: dict, after: threading.Thread | None) -> None:
        if after is not None:
            after.join()  # an older state must not land over this one
        try:
            checkpoint.save_state(self.out_dir, _map_tensors(snapshot, lambda t: t.cpu()))
            self.last_stamp = checkpoint.stamp(self.out_dir)
            self.written += 1
            self.failed = False
        except Exception:  # noqa: BLE001 - a failed crash checkpoint must not end the training; the next one may work
            self.failed = True
            log.exception("could not write the periodic checkpoint of %s", self.out_dir)

    def wait(self) -> None:
        """Until the write in flight (if any) is on disk: before a final checkpoint, or removing the directory."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
