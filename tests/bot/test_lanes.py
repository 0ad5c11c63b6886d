"""Dispatcher lanes with real parts: two real `python -m trainer worker` processes on the tiny model (what
BOOTHBOT_WORKERS=local:cpu,cpu starts), one SQLite ledger per test, and the dispatcher's own loops."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import pytest_asyncio

from bot.dispatch.workers import build_workers, first_ready
from bot.services.admin import AdminService
from bot.settings import Settings
from bot.store.database import Store
from tests.bot.test_dispatcher import ALICE, BOB, Bot

pytestmark = pytest.mark.asyncio(loop_scope="module")

READY_TIMEOUT_S = 120


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def two_workers(tiny_model_dir, tmp_path_factory):
    """BOOTHBOT_WORKERS=local:cpu,cpu on the tiny model: the workers the bot itself would build."""
    settings = replace(Settings(), model=str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("lanes"),
                       workers="local:cpu,cpu", dtype="fp32")
    workers = await build_workers(settings)
    for worker in workers:
        worker.argv += ["--threads", "1"]  # two workers share this machine's cores
        worker.restart_delays_s = (0.1,)
        await worker.start()
    await asyncio.gather(*(worker.wait_ready(READY_TIMEOUT_S) for worker in workers))
    yield workers
    await asyncio.gather(*(worker.stop() for worker in workers))


class LanesBot(Bot):
    """test_dispatcher's Bot, with a list of workers: one dispatcher lane each."""

    def lane_running(self, job_id: int):
        return next((lane for lane in self.dispatcher.lanes if lane.runner.current_job_id == job_id), None)

    async def wait_ended(self, *job_ids: int, timeout: float = 180):
        await self.notifier.wait_for(lambda: set(job_ids) <= set(self.notifier.finished_ids()), timeout)
        return [await self.ledger.get(job_id) for job_id in job_ids]


@pytest_asyncio.fixture(loop_scope="module")
async def bot(tmp_path, two_workers):
    await asyncio.gather(*(worker.wait_ready(READY_TIMEOUT_S) for worker in two_workers))  # after a kill
    settings = replace(Settings(), data_dir=tmp_path / "data", max_queued_jobs=10, trainings_per_day=10,
                       train_slice_s=60.0)
    store = await Store.open(settings.db_path)
    bot = LanesBot(settings, store, two_workers)
    yield bot
    await bot.dispatcher.stop(grace_s=30)
    await store.close()


def overlap(a, b) -> bool:
    return a.started_at < b.finished_at and b.started_at < a.finished_at


async def test_two_imagine_jobs_run_at_the_same_time_on_two_lanes(bot):
    # Different step counts: they cannot share one batch, so each needs a worker of its own.
    first = await bot.imagine(ALICE, steps=12)
    second = await bot.imagine(BOB, steps=13)
    await bot.dispatcher.start()
    first, second = await bot.wait_ended(first.id, second.id)
    assert first.status == second.status == "succeeded", (first.error, second.error)
    assert overlap(first, second)
    assert [lane.runner.jobs_run for lane in bot.dispatcher.lanes] == [1, 1]
    assert bot.notifier.finished_ids().count(first.id) == bot.notifier.finished_ids().count(second.id) == 1


async def test_a_job_running_in_one_lane_counts_against_its_owner_in_the_other(bot):
    concept, training = await bot.train(ALICE, "sid", steps=5000)  # runs in one lane until cancelled
    await bot.dispatcher.start()
    await bot.notifier.wait_for(lambda: any(j == training.id for j, _ in bot.notifier.progress))
    admin = AdminService(bot.store, bot.ledger, bot.settings)
    await admin.pause(0)  # both queued before the free lane looks
    mine = await bot.imagine(ALICE, steps=3)       # queued first, but Alice is using a GPU already
    bobs = await bot.imagine(BOB, steps=4)
    await admin.resume(0)
    bot.dispatcher.wake()
    await bot.wait_ended(bobs.id, mine.id)
    mine, bobs = await bot.ledger.get(mine.id), await bot.ledger.get(bobs.id)
    assert mine.status == bobs.status == "succeeded"
    assert bobs.started_at < mine.started_at
    # Running (cancel requested) or between two of its runs, having yielded to the imagines (cancelled at once):
    # which one depends on the moment (CI on a loaded 2-core machine met the second).
    assert await bot.ledger.cancel(training.id, ALICE) in ("requested", "cancelled")
    [cancelled] = await bot.wait_ended(training.id)
    assert cancelled.status == "cancelled"


async def test_a_worker_killed_mid_training_resumes_it_in_the_other_lane_delivered_once(bot):
    bot.dispatcher.settings = replace(bot.settings, train_slice_s=0.01)  # a checkpoint after every step
    concept, training = await bot.train(ALICE, "sid", steps=6)
    await bot.dispatcher.start()
    await bot.notifier.wait_for(lambda: any(j == training.id and e["step"] >= 2 for j, e in bot.notifier.progress))
    killed = bot.lane_running(training.id)
    while killed is None:  # between two slices: catch it on the GPU
        assert (await bot.ledger.get(training.id)).progress_step < 6, "the training ended before it could be killed"
        await asyncio.sleep(0.01)
        killed = bot.lane_running(training.id)
    await killed.worker.kill()
    [done] = await bot.wait_ended(training.id)
    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and done.result["steps"] == 6
    other = next(lane for lane in bot.dispatcher.lanes if lane is not killed)
    assert (other.runner.jobs_run, killed.runner.jobs_run) == (1, 0)  # it ended in the lane that worked
    assert (await bot.concepts.get(concept.id)).status == "ready"
    assert bot.notifier.finished_ids() == [training.id]


async def test_an_imagine_prefers_the_free_lane_that_holds_its_lora_when_both_start_now(bot):
    concept, training = await bot.train(ALICE, "sid", steps=2)
    await bot.dispatcher.run_next()
    lora = (await bot.concepts.get(concept.id)).lora_path
    holder, other = bot.dispatcher.lanes
    use = await bot.imagine(ALICE, prompt="a photo of sid man")
    holder.runner.affinity.remember(use, await bot.dispatcher.worker_params(use))
    assert holder.runner.affinity.held == [lora]
    await bot.ledger.cancel(use.id, ALICE)
    plain = await bot.imagine(BOB, prompt="a photo of a dog")   # first in fair order (Alice used the GPU)
    sid = await bot.imagine(ALICE, prompt="sid at the beach")

    other.busy = True  # the other lane is running something: the holder takes the fair first
    assert (await bot.dispatcher._claim_for(holder, None)).id == plain.id
    await bot.ledger.fail(plain.id, "test over")
    plain = await bot.imagine(BOB, prompt="a photo of a cat")
    other.busy = False  # both lanes free: both jobs start now, so the holder takes the one with its LoRA
    assert (await bot.dispatcher._claim_for(holder, None)).id == sid.id
    assert (await bot.dispatcher._claim_for(other, None)).id == plain.id


async def test_one_worker_that_cannot_start_leaves_the_bot_serving_with_the_other(bot, two_workers, tiny_model_dir,
                                                                               tmp_path):
    settings = replace(Settings(), model=str(tiny_model_dir), data_dir=tmp_path, workers="local:cuda:1",
                       dtype="fp32")
    [broken] = await build_workers(settings)  # this machine has no CUDA GPU: the worker reports why and exits
    broken.restart_delays_s = (3600.0,)
    await broken.start()
    try:
        assert await first_ready([broken, two_workers[0]]) is None  # the bot serves
        await broken.wait_first_start()
        serving = LanesBot(bot.settings, bot.store, [broken, two_workers[0]])
        down, up = serving.dispatcher.lane_statuses()
        assert (down.label, down.state) == ("cuda:1", "down") and "sees no CUDA GPU" in down.problem
        assert up.state == "ready"
        job = await serving.imagine(BOB)
        await serving.dispatcher.start()
        [done] = await serving.wait_ended(job.id)
        assert done.status == "succeeded", done.error
        await serving.dispatcher.stop(grace_s=30)
        assert (await first_ready([broken])).args[0].startswith("device cuda:1 was asked for but torch sees no CUDA")
    finally:
        await broken.stop()
