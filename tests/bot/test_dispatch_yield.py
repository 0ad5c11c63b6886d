"""Training that pauses only when someone waits, through the dispatcher and the real worker process (tiny model):
an /imagine queued during a training makes it yield at a step boundary, runs, and the training goes on; a worker
killed mid-training resumes from the periodic crash checkpoint, not from the start; an empty queue makes the worker
prefill class images, which a member's job stops."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace

import pytest
import pytest_asyncio
import torch

from bot.dispatch.prefill import classes_to_prefill
from bot.settings import Settings
from bot.store.database import Store
from tests.bot.test_dispatcher import ALICE, BOB, READY_TIMEOUT_S, Bot
from trainer.training import checkpoint

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG = 5000  # steps: far more than run before the test's events; each test cancels its training at the end


@pytest_asyncio.fixture(loop_scope="module")
async def bot(tmp_path, worker):
    # No slices (the default): a training pauses only when someone waits.
    settings = replace(Settings(), data_dir=tmp_path / "data", train_slice_s=None, train_checkpoint_s=10.0,
                       max_queued_jobs=10, trainings_per_day=10)
    store = await Store.open(settings.db_path)
    bot = Bot(settings, store, worker)
    yield bot
    await bot.dispatcher.stop(grace_s=30)
    await store.close()


def _steps(bot, job_id, since=0) -> list[int]:
    return [e["step"] for j, e in bot.notifier.progress[since:] if j == job_id and e.get("stage") == "training"]


async def _cancel_and_wait(bot, train) -> None:
    assert await bot.ledger.cancel(train.id, ALICE) == "requested"
    await bot.notifier.wait_for(lambda: train.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    assert (await bot.ledger.get(train.id)).status == "cancelled"


async def test_an_imagine_queued_during_a_training_runs_before_the_training_ends(bot):
    concept, train = await bot.train(ALICE, "sid", steps=LONG)
    await bot.dispatcher.start()
    await bot.notifier.wait_for(lambda: _steps(bot, train.id), READY_TIMEOUT_S)
    imagine = await bot.imagine(BOB)
    bot.dispatcher.wake()  # what Services.job_submitted does
    await bot.notifier.wait_for(lambda: imagine.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    assert (await bot.ledger.get(imagine.id)).status == "succeeded"
    paused_at = (await bot.ledger.get(train.id)).progress_step
    assert 1 <= paused_at < LONG and bot.dispatcher.runner.yields.requested == 1
    since = len(bot.notifier.progress)
    await bot.notifier.wait_for(lambda: _steps(bot, train.id, since), READY_TIMEOUT_S)  # it trains on
    assert _steps(bot, train.id, since)[0] > paused_at  # from where it paused
    await _cancel_and_wait(bot, train)


def _saved_step(path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


async def test_a_killed_worker_resumes_the_training_from_its_periodic_checkpoint(bot, worker):
    bot.dispatcher.settings = replace(bot.settings, train_checkpoint_s=0)  # a crash checkpoint at every step
    concept, train = await bot.train(ALICE, "sid", steps=LONG)
    state_file = checkpoint.checkpoint_dir(bot.concepts.concept_dir(concept.id)) / checkpoint.STATE_FILE
    await bot.dispatcher.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while _saved_step(state_file) < 3:  # no slice ever ended: only the periodic checkpoint writes this
        assert time.monotonic() < deadline, "no periodic checkpoint"
        await asyncio.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    while (await bot.ledger.get(train.id)).attempts < 1:  # the crash is recorded: every event before it was read
        assert time.monotonic() < deadline + READY_TIMEOUT_S, await bot.ledger.get(train.id)
        await asyncio.sleep(0.1)
    since, saved = len(bot.notifier.progress), _saved_step(state_file)
    await bot.notifier.wait_for(lambda: _steps(bot, train.id, since), READY_TIMEOUT_S * 2)
    assert _steps(bot, train.id, since)[0] == saved + 1  # nothing before the last checkpoint was lost
    await _cancel_and_wait(bot, train)


async def test_an_empty_queue_prefills_the_most_used_classes_until_a_member_job_arrives(bot, worker):
    for token, class_name in (("dogone", "dog"), ("dogtwo", "dog"), ("catone", "cat")):
        await bot.store.execute("INSERT INTO concepts (guild_id, owner_id, token, class_name, created_at, updated_at) "
                                "VALUES (?, ?, ?, ?, 0, 0)",
                                (5, ALICE, token, class_name))
    assert await classes_to_prefill(bot.store) == ["dog", "cat", "man", "woman", "person", "boy", "girl", "style"]
    await bot.dispatcher.start()  # nothing queued: the GPU is idle
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (worker.last_prefill or {}).get("class_name") != "dog":  # class images of the most used class are made
        assert time.monotonic() < deadline, f"no prefill: {worker.last_prefill}"
        await asyncio.sleep(0.1)
    assert bot.dispatcher.prefill.sent == 1
    imagine = await bot.imagine(BOB)
    bot.dispatcher.wake()
    await bot.notifier.wait_for(lambda: imagine.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    assert (await bot.ledger.get(imagine.id)).status == "succeeded"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while bot.dispatcher.prefill.sent < 2:  # idle again: it goes on
        assert time.monotonic() < deadline, "no second prefill"
        await asyncio.sleep(0.1)
