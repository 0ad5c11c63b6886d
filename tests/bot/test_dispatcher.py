"""The dispatcher with real parts: SQLite ledger and services in tmp_path, the real worker process on the tiny model.

One worker (model resident) serves the whole module, as it serves the bot; each test has its own database.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from bot.services.concepts import ConceptService
from bot.dispatch.dispatcher import Dispatcher
from bot.services.gallery import Gallery
from bot.jobs import kinds
from bot.jobs.kinds import CONCEPT_GONE
from bot.jobs.ledger import MAX_RECOVERIES, Ledger
from bot.settings import Settings
from bot.store.database import Store
from bot.dispatch.worker_client import CRASHED, WorkerClient
from trainer.contract.protocol import JobKind

pytestmark = pytest.mark.asyncio(loop_scope="module")

GUILD = 111111111111111111
ALICE, BOB, CAROL = 1001, 1002, 1003
READY_TIMEOUT_S = 120
FAST_IMAGINE = {"prompt": "a photo of a dog", "steps": 2, "count": 1, "width": 64, "height": 64, "seed": 5}
FAST_TRAIN = {"prior_preservation": False, "sample_count": 0, "train_text_encoder": False, "resolution": 64}


class RecordingNotifier:
    """What the Discord delivery cog does, minus Discord: announce once (mark_delivered), remember what was shown."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.progress: list[tuple[int, dict]] = []
        self.finished: list = []
        self.changed = asyncio.Event()

    async def job_progress(self, job, event):
        self.progress.append((job.id, event))
        self.changed.set()

    async def job_finished(self, job):
        if await self.ledger.mark_delivered(job.id):
            self.finished.append(job)
        self.changed.set()

    def finished_ids(self) -> list[int]:
        return [job.id for job in self.finished]

    async def wait_for(self, predicate, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out waiting"
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass


class Bot:
    """The bot's services on one database, with the shared worker."""

    def __init__(self, settings: Settings, store: Store, worker: WorkerClient):
        self.settings = settings
        self.store = store
        self.ledger = Ledger(store, settings=settings)
        self.concepts = ConceptService(store, settings.data_dir)
        self.gallery = Gallery(store)
        self.notifier = RecordingNotifier(self.ledger)
        self.dispatcher = Dispatcher(settings, self.ledger, self.concepts, self.gallery, worker,
                                     notifier=self.notifier, poll_s=0.2)

    async def image_paths(self, job_id: int) -> list[str]:
        """The images the gallery recorded for the job."""
        rows = await self.store.fetchall("SELECT path FROM images WHERE job_id = ? ORDER BY id", (job_id,))
        return [row["path"] for row in rows]

    async def imagine(self, owner: int, **params):
        return await self.ledger.submit("imagine", owner, GUILD, 5, {**FAST_IMAGINE, **params})

    async def train(self, owner: int, token: str, *, photos: int = 3, **params):
        concept = await self.concepts.create(GUILD, owner, token, "man")
        photos_dir = self.concepts.concept_dir(concept.id) / "photos"
        photos_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(concept.id)
        for i in range(photos):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos_dir / f"{i:03d}.png")
        job = await self.ledger.submit("train", owner, GUILD, 5, {"concept_id": concept.id, **FAST_TRAIN, **params})
        await self.concepts.attach_job(concept.id, job.id, photos)
        return concept, job


@pytest_asyncio.fixture(loop_scope="module")
async def bot(tmp_path, worker):
    # Slices of 0.01 s end after every training step, so a 3-step training runs in 3 slices on any machine.
    settings = replace(Settings(), data_dir=tmp_path / "data", train_slice_s=0.01, max_queued_jobs=10,
                       trainings_per_day=10)
    store = await Store.open(settings.db_path)
    bot = Bot(settings, store, worker)
    yield bot
    await bot.dispatcher.stop(grace_s=30)
    await store.close()


def run_without_slices(bot: Bot) -> None:
    """A training runs until someone waits, as in production: with 0.01 s slices it is queued again between any two
    steps, and a cancel there ends it at once ("cancelled") instead of at its next step ("requested")."""
    bot.dispatcher.settings = replace(bot.settings, train_slice_s=None)


async def test_imagine_job_runs_end_to_end(bot):
    job = await bot.imagine(ALICE)
    assert (await bot.dispatcher.run_next()).id == job.id
    done = await bot.ledger.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.gpu_seconds > 0 and done.progress_step == done.progress_total == 2
    images = done.result["images"]
    assert len(images) == 1 and Path(images[0]).is_file()
    assert Path(images[0]).parent == (bot.settings.data_dir / "images" / str(job.id)).resolve()
    assert await bot.image_paths(job.id) == images
    assert bot.notifier.finished_ids() == [job.id]
    assert any(job_id == job.id and e["step"] == 2 for job_id, e in bot.notifier.progress)
    assert await bot.dispatcher.run_next() is None  # nothing left


async def test_member_mistake_fails_the_job_with_the_engine_message(bot):
    job = await bot.imagine(ALICE, prompt="a photo of zorblax", steps=500)
    await bot.dispatcher.run_next()
    failed = await bot.ledger.get(job.id)
    assert failed.status == "failed"
    assert "Steps" in failed.error and "500" in failed.error  # the option, the value and what is allowed
    assert bot.notifier.finished_ids() == [job.id]


async def test_training_runs_in_slices_with_imagine_jobs_in_between(bot):
    concept, train = await bot.train(ALICE, "sid", steps=3)
    imagine = await bot.imagine(BOB)  # queued after the training, runs between its slices
    assert (await bot.dispatcher.run_next()).id == train.id  # older, same usage: the training goes first
    trained = await bot.ledger.get(train.id)
    imagined = await bot.ledger.get(imagine.id)
    assert trained.status == "succeeded", trained.error
    assert imagined.status == "succeeded", imagined.error
    assert trained.started_at < imagined.started_at < imagined.finished_at < trained.finished_at
    assert trained.result["steps"] == 3 and trained.gpu_seconds > 0
    ready = await bot.concepts.get(concept.id)
    assert ready.status == "ready" and Path(ready.lora_path).is_file()
    assert Path(ready.lora_path).parent == bot.concepts.concept_dir(concept.id).resolve()
    assert bot.notifier.finished_ids() == [imagine.id, train.id]
    # The new concept is usable at once: its owner's next /imagine gets its LoRA.
    use = await bot.imagine(ALICE, prompt="a photo of sid man")
    params = await bot.dispatcher.worker_params(await bot.ledger.get(use.id))
    assert params["concepts"] == [{"concept_id": concept.id, "token": "sid", "class_name": "man",
                                   "lora_path": ready.lora_path, "weight": 1.0}]
    await bot.dispatcher.run_next()
    assert (await bot.ledger.get(use.id)).status == "succeeded"


async def test_others_private_concepts_are_plain_text(bot):
    concept, train = await bot.train(ALICE, "sid", steps=2)
    await bot.dispatcher.run_next()
    assert (await bot.concepts.get(concept.id)).status == "ready"
    job = await bot.imagine(BOB, prompt="a photo of sid man")
    params = await bot.dispatcher.worker_params(await bot.ledger.get(job.id))
    assert params["concepts"] == [] and "forbidden_tokens" not in params
    await bot.dispatcher.run_next()
    done = await bot.ledger.get(job.id)
    assert done.status == "succeeded", done.error
    assert "<lora:" not in done.result["parameters"]


async def test_cancel_of_a_running_training_stops_it_at_a_step_boundary(bot):
    run_without_slices(bot)
    concept, train = await bot.train(ALICE, "sid", steps=5000)
    runner = asyncio.create_task(bot.dispatcher.run_next())
    await bot.notifier.wait_for(lambda: any(j == train.id and e["step"] >= 1 for j, e in bot.notifier.progress))
    assert await bot.ledger.cancel(train.id, ALICE) == "requested"
    asked = time.monotonic()
    await asyncio.wait_for(runner, 60)
    cancelled = await bot.ledger.get(train.id)
    assert cancelled.status == "cancelled"
    assert time.monotonic() - asked < 30
    assert (await bot.concepts.get(concept.id)).status == "failed"
    assert bot.notifier.finished_ids() == [train.id]


async def test_imagine_past_its_time_limit_is_stopped(bot):
    bot.dispatcher.settings = replace(bot.settings, imagine_timeout_s=1)
    job = await bot.imagine(ALICE, steps=100, count=4, width=128, height=128)
    started = time.monotonic()
    await bot.dispatcher.run_next()
    stopped = await bot.ledger.get(job.id)
    assert stopped.status == "failed"
    assert stopped.error == "Your job ran longer than the limit of 1 s and was stopped."
    assert time.monotonic() - started < 30
    assert bot.notifier.finished_ids() == [job.id]


async def test_worker_death_mid_training_requeues_it_from_its_checkpoint_and_the_queue_goes_on(bot, worker):
    run_without_slices(bot)
    concept, train = await bot.train(ALICE, "sid", steps=5000)
    after = await bot.imagine(BOB)
    await bot.dispatcher.start()
    await bot.notifier.wait_for(lambda: any(j == train.id and e["step"] >= 1 for j, e in bot.notifier.progress))
    os.kill(worker.pid, signal.SIGKILL)
    await bot.notifier.wait_for(lambda: after.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    assert (await bot.ledger.get(after.id)).status == "succeeded"
    progress_before = len(bot.notifier.progress)  # the crashed run's events were all read before this job ran

    deadline = time.monotonic() + READY_TIMEOUT_S
    while not any(j == train.id and e["step"] >= 1 for j, e in bot.notifier.progress[progress_before:]):
        assert time.monotonic() < deadline, await bot.ledger.get(train.id)
        await asyncio.sleep(0.2)  # until it trains again, on the restarted worker
    assert (await bot.ledger.get(train.id)).attempts == 1
    assert (await bot.concepts.get(concept.id)).status == "training"
    assert train.id not in bot.notifier.finished_ids()  # nothing told to the member: it simply goes on
    assert await bot.ledger.cancel(train.id, ALICE) == "requested"
    await bot.notifier.wait_for(lambda: train.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    assert (await bot.ledger.get(train.id)).status == "cancelled"


async def test_a_training_that_keeps_killing_the_worker_fails_after_its_recoveries(bot, worker):
    concept, train = await bot.train(ALICE, "sid", steps=5000)
    await bot.store.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (MAX_RECOVERIES, train.id))
    await bot.dispatcher.start()
    await bot.notifier.wait_for(lambda: any(j == train.id and e["step"] >= 1 for j, e in bot.notifier.progress))
    os.kill(worker.pid, signal.SIGKILL)
    await bot.notifier.wait_for(lambda: train.id in bot.notifier.finished_ids(), READY_TIMEOUT_S)
    crashed = await bot.ledger.get(train.id)
    assert crashed.status == "failed" and crashed.error == CRASHED
    assert (await bot.concepts.get(concept.id)).status == "failed"
    await worker.wait_ready(READY_TIMEOUT_S)  # the next test finds a worker again


async def test_a_training_whose_concept_was_deleted_fails_without_the_gpu(bot):
    concept, train = await bot.train(ALICE, "sid", steps=2)
    await bot.store.execute("UPDATE concepts SET status = 'deleted' WHERE id = ?", (concept.id,))
    await bot.dispatcher.run_next()
    failed = await bot.ledger.get(train.id)
    assert failed.status == "failed" and failed.error == CONCEPT_GONE and failed.gpu_seconds == 0


async def test_start_recovers_a_running_training_and_announces_the_backlog_once(bot):
    # A previous bot process claimed a training and finished (but never announced) an /imagine, then died.
    concept, train = await bot.train(ALICE, "sid", steps=3)
    unannounced = await bot.imagine(CAROL)
    assert (await bot.ledger.claim(unannounced.id)).status == "running"
    await bot.ledger.fail(unannounced.id, "The GPU ran out of memory while running your job.", 1.0)
    assert (await bot.ledger.claim(train.id)).status == "running"
    bot.dispatcher.notifier = None
    await bot.dispatcher.start()
    recovered = await bot.ledger.get(train.id)
    assert recovered.attempts == 1  # running -> queued by recover_at_start, then run again
    await asyncio.sleep(0.3)
    assert bot.notifier.finished == []  # no notifier attached yet: nothing is announced, nothing is lost
    bot.dispatcher.set_notifier(bot.notifier)
    await bot.notifier.wait_for(lambda: len(bot.notifier.finished) == 2)
    assert sorted(bot.notifier.finished_ids()) == sorted([unannounced.id, train.id])
    assert (await bot.ledger.get(train.id)).status == "succeeded"
    assert (await bot.concepts.get(concept.id)).status == "ready"
    bot.dispatcher.set_notifier(bot.notifier)  # attaching again announces nothing twice
    await asyncio.sleep(0.3)
    assert len(bot.notifier.finished) == 2


async def test_a_bot_error_while_recording_fails_the_job_instead_of_leaving_it_running(bot, monkeypatch):
    job = await bot.imagine(ALICE)
    real_succeed = bot.ledger.succeed

    async def broken_once(*args, **kwargs):
        monkeypatch.setattr(bot.ledger, "succeed", real_succeed)
        raise RuntimeError("disk I/O error")  # what sqlite says when the disk goes away

    monkeypatch.setattr(bot.ledger, "succeed", broken_once)
    with pytest.raises(RuntimeError, match="disk I/O error"):
        await bot.dispatcher.run_next()
    failed = await bot.ledger.get(job.id)
    assert failed.status == "failed" and f"job {job.id}" in failed.error
    assert bot.notifier.finished_ids() == [job.id]
    assert (await bot.dispatcher.run_next()) is None  # and the queue goes on


async def test_a_bot_error_on_an_imagine_between_slices_fails_only_that_imagine(bot, monkeypatch):
    concept, train = await bot.train(ALICE, "sid", steps=3)
    imagine = await bot.imagine(BOB)  # runs between the training's slices
    real_succeed = bot.ledger.succeed

    async def broken_for_imagine(job_id, *args, **kwargs):
        if job_id == imagine.id:
            raise RuntimeError("disk I/O error")
        return await real_succeed(job_id, *args, **kwargs)

    monkeypatch.setattr(bot.ledger, "succeed", broken_for_imagine)
    assert (await bot.dispatcher.run_next()).id == train.id
    failed, trained = await bot.ledger.get(imagine.id), await bot.ledger.get(train.id)
    assert failed.status == "failed" and f"job {imagine.id}" in failed.error
    assert trained.status == "succeeded", trained.error
    assert sorted(bot.notifier.finished_ids()) == sorted([imagine.id, train.id])


async def test_queued_imagine_jobs_of_three_members_run_as_one_batch(bot, caplog):
    caplog.set_level(logging.INFO, logger="boothbot.worker")
    alice = await bot.imagine(ALICE)
    bob = await bot.imagine(BOB, count=2, prompt="a photo of a man", seed=9)
    carol = await bot.imagine(CAROL, width=None, height=None, steps=1)  # another size and steps: not in this batch
    dave = await bot.imagine(CAROL + 1, cfg=7.0, scheduler="dpmpp_2m_karras")  # the defaults, spelled out
    assert (await bot.dispatcher.run_next()).id == alice.id

    assert bot.dispatcher.batches_run == 1
    deadline = time.monotonic() + 10  # the worker's own account of the request, from its log
    while not any("3 imagine job(s) in one batch" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the worker did not log the batch"
        await asyncio.sleep(0.05)
    batch = [await bot.ledger.get(job.id) for job in (alice, bob, dave)]
    for job, count in zip(batch, (1, 2, 1)):
        assert job.status == "succeeded", job.error
        assert len(job.result["images"]) == count and all(Path(p).is_file() for p in job.result["images"])
        assert {Path(p).parent for p in job.result["images"]} == {(bot.settings.data_dir / "images" /
                                                                   str(job.id)).resolve()}
        assert await bot.image_paths(job.id) == job.result["images"]
        assert any(job_id == job.id and e["step"] == 2 for job_id, e in bot.notifier.progress)
        assert job.progress_step == job.progress_total == 2
    # One loop's GPU time, split by the images each member got.
    per_image = [job.gpu_seconds / count for job, count in zip(batch, (1, 2, 1))]
    assert per_image[0] > 0 and per_image == pytest.approx([per_image[0]] * 3, rel=1e-9)
    assert (await bot.ledger.get(carol.id)).status == "queued"
    assert sorted(bot.notifier.finished_ids()) == sorted([alice.id, bob.id, dave.id])  # each announced once

    assert (await bot.dispatcher.run_next()).id == carol.id  # alone: a batch of one keeps using `run`
    assert bot.dispatcher.batches_run == 1 and (await bot.ledger.get(carol.id)).status == "succeeded"
    assert len(bot.notifier.finished_ids()) == len(set(bot.notifier.finished_ids())) == 4


async def test_a_member_cancelling_inside_a_batch_stops_only_their_job(bot, monkeypatch):
    monkeypatch.setattr("bot.dispatch.cancels.CANCEL_POLL_S", 0.05)
    jobs = [await bot.imagine(owner, steps=8) for owner in (ALICE, BOB, CAROL)]
    runner = asyncio.create_task(bot.dispatcher.run_next())
    await bot.notifier.wait_for(lambda: any(j == jobs[1].id for j, _ in bot.notifier.progress))
    assert await bot.ledger.cancel(jobs[1].id, BOB) == "requested"
    await asyncio.wait_for(runner, 60)

    assert bot.dispatcher.batches_run == 1
    ended = [await bot.ledger.get(job.id) for job in jobs]
    assert [job.status for job in ended] == ["succeeded", "cancelled", "succeeded"]
    assert await bot.image_paths(jobs[1].id) == []
    assert sorted(bot.notifier.finished_ids()) == sorted(job.id for job in jobs)


async def test_worker_death_mid_batch_fails_every_job_of_it(bot, worker):
    jobs = [await bot.imagine(owner, steps=50) for owner in (ALICE, BOB, CAROL)]
    runner = asyncio.create_task(bot.dispatcher.run_next())
    await bot.notifier.wait_for(lambda: bool(bot.notifier.progress))
    os.kill(worker.pid, signal.SIGKILL)
    await asyncio.wait_for(runner, 60)
    for job in jobs:
        crashed = await bot.ledger.get(job.id)
        assert (crashed.status, crashed.error) == ("failed", CRASHED)
    assert sorted(bot.notifier.finished_ids()) == sorted(job.id for job in jobs)
    await worker.wait_ready(READY_TIMEOUT_S)  # the next test finds a worker again


async def test_a_kind_registered_in_one_place_runs_through_the_dispatcher_and_the_worker(bot, monkeypatch):
    # The bot has never queued the worker's `selftest` kind: one registry entry (for this test only) is all it takes
    # for the ledger, the dispatcher and the worker to run it, with the entry's params, time limit and result keeper.
    kept = []

    async def params(job, context):
        return {**job.params, "size": 16}

    async def keep(job, result, context):
        kept.append((job.id, result["steps"], result["size"]))

    monkeypatch.setitem(kinds.KINDS, JobKind.SELFTEST, kinds.KindSpec(
        JobKind.SELFTEST, worker_params=params, keep_result=keep, timeout_s=lambda settings: 1.0,
        interrupted=lambda job: "The bot restarted; please run the self-test again."))
    # The schema lists the kinds it stores (CHECK in 0001_initial.sql); a real new kind widens it in a migration.
    await bot.store.execute("PRAGMA ignore_check_constraints = ON")
    job = await bot.ledger.submit(JobKind.SELFTEST, ALICE, GUILD, 5, {"seconds": 0.3, "step_s": 0.1})
    assert (await bot.dispatcher.run_next()).id == job.id
    done = await bot.ledger.get(job.id)
    assert done.status == "succeeded", done.error
    assert kept == [(job.id, 3, 16)] and done.progress_step == done.progress_total == 3
    assert bot.notifier.finished_ids() == [job.id]

    too_long = await bot.ledger.submit(JobKind.SELFTEST, ALICE, GUILD, 5, {"seconds": 60, "step_s": 0.1})
    await bot.dispatcher.run_next()
    stopped = await bot.ledger.get(too_long.id)
    assert stopped.status == "failed"
    assert stopped.error == "Your job ran longer than the limit of 1 s and was stopped."
    assert kept == [(job.id, 3, 16)]
