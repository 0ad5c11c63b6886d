"""The progress-edit throttle and the text helpers the cogs render with."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from cogs._progress import EditThrottle
from cogs._render import progress_bar, running_embed

INTERVAL = 0.3


async def test_edits_are_throttled_and_the_latest_one_is_sent_after_the_interval():
    throttle = EditThrottle(INTERVAL)
    sent: list[tuple[int, float]] = []

    def edit(value):
        async def run():
            sent.append((value, time.monotonic()))
        return run

    for value in range(10):
        await throttle.submit("job-1", edit(value))
    await asyncio.sleep(INTERVAL * 2)
    assert [value for value, _ in sent] == [0, 9]
    assert sent[1][1] - sent[0][1] >= INTERVAL * 0.95


async def test_keys_are_independent_and_forget_drops_a_pending_edit():
    throttle = EditThrottle(INTERVAL)
    sent: list[str] = []

    def edit(value):
        async def run():
            sent.append(value)
        return run

    await throttle.submit("a", edit("a1"))
    await throttle.submit("b", edit("b1"))
    await throttle.submit("a", edit("a2"))  # pending: inside a's interval
    throttle.forget("a")                    # the job finished; its final message replaces progress
    await asyncio.sleep(INTERVAL * 2)
    assert sent == ["a1", "b1"]


def test_progress_bar():
    assert progress_bar(0, 10, 10) == "▱" * 10 + " 0%"
    assert progress_bar(5, 10, 10) == "▰" * 5 + "▱" * 5 + " 50%"
    assert progress_bar(12, 10, 10) == "▰" * 10 + " 100%"
    assert progress_bar(0, 0, 4).endswith(" 0%")


def test_running_embed_counts_steps_or_class_images():
    job = SimpleNamespace(id=7, kind="train", owner_id=1, params={"token": "sks", "class_name": "man"})
    training = running_embed(job, {"step": 40, "total": 800, "eta_s": 90, "stage": "training"}).description
    assert training.splitlines() == [progress_bar(40, 800), "step 40/800 · about 2 min left"]
    class_images = running_embed(job, {"step": 20, "total": 100, "eta_s": 30, "stage": "class_images",
                                       "detail": "making class images 20/100"}).description
    assert class_images.splitlines() == [progress_bar(20, 100) + " · about 30 s left", "making class images 20/100"]
