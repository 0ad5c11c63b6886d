"""PeriodicCheckpoint: a write queued behind one in flight (a yield's, behind a periodic one) does not make the
caller wait for the disk, and the files land in the order their states were taken."""
from __future__ import annotations

import threading
import time

import torch

from trainer.training import checkpoint
from trainer.training.periodic_checkpoint import PeriodicCheckpoint


def test_a_write_queued_behind_one_in_flight_does_not_wait_and_lands_last(tmp_path, monkeypatch):
    disk_free, landed = threading.Event(), []
    real_save = checkpoint.save_state

    def slow_first_write(out_dir, state):
        if state["step"] == 1:
            assert disk_free.wait(30), "the first write was never let through"
        path = real_save(out_dir, state)
        landed.append(state["step"])
        return path

    monkeypatch.setattr(checkpoint, "save_state", slow_first_write)
    writer = PeriodicCheckpoint(tmp_path, 0.0)
    lora = torch.ones(3)
    writer.save_async({"fingerprint": "f", "step": 1, "lora": lora})
    assert not writer.due()  # one periodic write at a time
    lora.add_(1)  # the training goes on: the state taken was a copy
    began = time.monotonic()
    writer.save_async({"fingerprint": "f", "step": 2, "lora": lora})  # the yield's
    assert time.monotonic() - began < 5 and landed == []  # queued, not waited for

    disk_free.set()
    writer.wait()
    assert landed == [1, 2] and writer.written == 2
    state = checkpoint.load_state(tmp_path, "f")
    assert state["step"] == 2 and torch.equal(state["lora"], torch.full((3,), 2.0))
    assert writer.last_stamp == checkpoint.stamp(tmp_path)
