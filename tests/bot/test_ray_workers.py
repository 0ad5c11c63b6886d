"""Ray worker actors (bot/dispatch/ray_workers.py, ray_client.py; trainer/remote/) on a local Ray cluster: two real
actors on the tiny model (CPU), each a lane: a Runner on the one SQLite ledger, as the dispatcher runs one per worker.

The cluster and its two actors start once for the module (Ray's start-up and two model loads are most of its time);
each test has its own database and data directory, which share no files with the actors' own directories.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from bot.dispatch.announcer import Announcer
from bot.dispatch.ray_client import RayWorkerClient
from bot.dispatch.ray_workers import UNREACHABLE, connect, start_ray_workers
from bot.dispatch.runner import Runner
from bot.dispatch.worker_client import WorkerClient
from bot.jobs.kinds import KindContext
from bot.jobs.ledger import Ledger
from bot.services.concepts import ConceptService
from bot.services.gallery import Gallery
from bot.settings import Settings, SettingsError, load_settings
from bot.store.database import Store
from trainer.contract.errors import SetupError

pytestmark = pytest.mark.asyncio(loop_scope="module")

GUILD = 111111111111111111
ALICE, BOB = 1001, 1002
READY_TIMEOUT_S = 300
FAST_TRAIN = {"prior_preservation": False, "sample_count": 0, "train_text_encoder": False, "resolution": 64}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2, log_to_driver=False,
             namespace="boothbot-tests", logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ray_workers(ray_cluster, tiny_model_dir, tmp_path_factory):
    settings = replace(Settings(), workers="auto", ray_cpu_workers=2, model=str(tiny_model_dir), dtype="fp32",
                       data_dir=tmp_path_factory.mktemp("unused"))
    clients = await start_ray_workers(settings)
    assert len(clients) == 2 and all(isinstance(client, RayWorkerClient) for client in clients)
    for client in clients:
        await client.start()
    for client in clients:
        await client.wait_ready(READY_TIMEOUT_S)
    yield clients
    for client in clients:
        await client.stop()


class Notifier:
    """The delivery cog minus Discord: marks each outcome delivered once and remembers what it announced."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.progress: list[tuple[int, dict]] = []
        self.finished: list[int] = []

    async def job_progress(self, job, event):
        self.progress.append((job.id, event))

    async def job_finished(self, job):
        if await self.ledger.mark_delivered(job.id):
            self.finished.append(job.id)

    async def wait_for(self, predicate, timeout: float = READY_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting"
            await asyncio.sleep(0.05)


class Lanes:
    """The bot's services on one database, and one Runner per Ray worker."""

    def __init__(self, settings: Settings, store: Store, workers: list[RayWorkerClient]):
        self.settings = settings
        self.store = store
        self.ledger = Ledger(store, settings=settings)
        self.concepts = ConceptService(store, settings.data_dir)
        self.gallery = Gallery(store)
        self.notifier = Notifier(self.ledger)
        announcer = Announcer(self.ledger, self.notifier)
        self.context = KindContext(settings, self.concepts, self.gallery)
        self.runners = [Runner(self.context, self.ledger, worker, announcer) for worker in workers]

    async def imagine(self, owner: int, **params):
        return await self.ledger.submit("imagine", owner, GUILD, 5, {"prompt": "a photo of a dog", "steps": 2,
                                                                     "count": 1, "width": 64, "height": 64,
                                                                     "seed": 5, **params})

    async def train(self, owner: int, token: str, **params):
        concept = await self.concepts.create(GUILD, owner, token, "man")
        photos_dir = self.concepts.concept_dir(concept.id) / "photos"
        photos_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(concept.id)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos_dir / f"{i:03d}.png")
        job = await self.ledger.submit("train", owner, GUILD, 5, {"concept_id": concept.id, **FAST_TRAIN, **params})
        await self.concepts.attach_job(concept.id, job.id, 3)
        return concept, job

    def steps_seen(self, job_id: int) -> list[int]:
        return [event["step"] for j, event in self.notifier.progress if j == job_id and event.get("stage") != "samples"]


@pytest_asyncio.fixture(loop_scope="module")
async def lanes(tmp_path, ray_workers):
    settings = replace(Settings(), data_dir=tmp_path / "data", train_slice_s=0.5, max_queued_jobs=10,
                       trainings_per_day=10, imagine_timeout_s=3600, train_timeout_s=3600)  # slow shared CPUs
    store = await Store.open(settings.db_path)
    for worker in ray_workers:
        await worker.wait_ready(READY_TIMEOUT_S)  # an earlier test may have killed it: Ray restarts it
        worker.root = settings.data_dir.resolve()  # this test's data directory (the actors never see it)
    yield Lanes(settings, store, ray_workers)
    await store.close()


async def test_two_imagine_jobs_run_at_the_same_time_on_two_actors(lanes, ray_workers):
    # Different step counts: the two jobs cannot share one batch, so each lane claims one.
    first, second = await lanes.imagine(ALICE, steps=40), await lanes.imagine(BOB, steps=41)
    requests = [worker.requests for worker in ray_workers]
    claimed = await asyncio.gather(*(runner.run_next() for runner in lanes.runners))
    assert sorted(job.id for job in claimed) == [first.id, second.id]
    for job in (first, second):
        done = await lanes.ledger.get(job.id)
        assert done.status == "succeeded", done.error
        image = Path(done.result["images"][0])
        assert image.is_file() and image.parent == (lanes.settings.data_dir / "images" / str(job.id)).resolve()
        assert Image.open(image).size == (64, 64)
    a, b = [await lanes.ledger.get(job.id) for job in (first, second)]
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # they overlapped: two actors at once
    assert sorted(lanes.notifier.finished) == [a.id, b.id]
    assert [worker.requests for worker in ray_workers] == [n + 1 for n in requests]  # one job on each


async def test_a_lora_trained_on_one_actor_reaches_the_other_once_and_slices_resend_nothing(lanes, ray_workers):
    trainer_lane, other_lane = lanes.runners
    # A slice per step and per batch of class images: several requests, each resuming from the checkpoint
    lanes.context.settings = replace(lanes.settings, train_slice_s=0.01)
    concept, train = await lanes.train(ALICE, "sid", steps=4)
    sent_before, requests_before = trainer_lane.worker.bytes_sent, trainer_lane.worker.requests
    assert (await trainer_lane.run_next()).id == train.id
    assert trainer_lane.worker.requests - requests_before >= 4  # at least one per training step
    trained = await lanes.ledger.get(train.id)
    assert trained.status == "succeeded", trained.error
    ready = await lanes.concepts.get(concept.id)
    lora = Path(ready.lora_path)
    assert lora.is_file() and lora.parent == lanes.concepts.concept_dir(concept.id).resolve()
    assert not (lora.parent / "checkpoint").exists()  # the actor removed it at the end; so did the bot
    photos = sum(p.stat().st_size for p in (lora.parent / "photos").iterdir())
    assert trainer_lane.worker.bytes_sent - sent_before == photos  # photos once; its own checkpoints never

    sent = other_lane.worker.bytes_sent
    for _ in range(2):
        job = await lanes.imagine(ALICE, prompt="a photo of sid man")
        assert (await other_lane.run_next()).id == job.id
        done = await lanes.ledger.get(job.id)
        assert done.status == "succeeded", done.error
        assert "sid" in done.result["parameters"]
    assert other_lane.worker.bytes_sent - sent == lora.stat().st_size  # the LoRA went to that actor once


async def test_killing_an_actor_mid_training_resumes_it_on_the_other_and_delivers_it_once(lanes, ray_workers,
                                                                                          ray_cluster):
    doomed, survivor = lanes.runners
    concept, train = await lanes.train(ALICE, "sid", steps=30)
    running = asyncio.create_task(doomed.run_next())
    # A slice ended and its checkpoint came back; the training is on its next slice.
    await lanes.notifier.wait_for(lambda: len(set(lanes.steps_seen(train.id))) >= 3 and
                                  (lanes.settings.data_dir / f"concepts/{concept.id}/checkpoint/state.pt").is_file())
    ray_cluster.kill(doomed.worker.actor, no_restart=False)
    assert (await asyncio.wait_for(running, READY_TIMEOUT_S)).id == train.id
    requeued = await lanes.ledger.get(train.id)
    assert requeued.status == "queued" and requeued.attempts == 1, requeued.error
    seen = len(lanes.notifier.progress)

    assert (await survivor.run_next()).id == train.id
    done = await lanes.ledger.get(train.id)
    assert done.status == "succeeded", done.error
    resumed_at = min(e["step"] for j, e in lanes.notifier.progress[seen:] if j == train.id and e["step"])
    assert resumed_at > 1  # from the checkpoint, not from the start
    assert lanes.notifier.finished == [train.id]
    assert Path((await lanes.concepts.get(concept.id)).lora_path).is_file()
    await doomed.worker.wait_ready(READY_TIMEOUT_S)
    assert doomed.worker.starts == 2


async def test_an_imagine_whose_actor_dies_is_run_once_more(lanes, ray_workers, ray_cluster):
    lane = lanes.runners[0]
    job = await lanes.imagine(BOB, steps=100)
    running = asyncio.create_task(lane.run_next())
    await lanes.notifier.wait_for(lambda: running.done() or any(j == job.id for j, _ in lanes.notifier.progress))
    assert not running.done(), await lanes.ledger.get(job.id)
    starts = lane.worker.starts
    ray_cluster.kill(lane.worker.actor, no_restart=False)
    await asyncio.wait_for(running, READY_TIMEOUT_S)
    done = await lanes.ledger.get(job.id)
    assert done.status == "succeeded", done.error
    assert lane.worker.starts == starts + 1 and lanes.notifier.finished == [job.id]


async def test_a_member_cancel_reaches_the_job_running_on_an_actor(lanes):
    lane = lanes.runners[1]
    job = await lanes.imagine(ALICE, steps=100)
    running = asyncio.create_task(lane.run_next())
    await lanes.notifier.wait_for(lambda: running.done() or any(j == job.id for j, _ in lanes.notifier.progress))
    assert await lanes.ledger.cancel(job.id, ALICE) == "requested"
    await asyncio.wait_for(running, READY_TIMEOUT_S)
    cancelled = await lanes.ledger.get(job.id)
    assert cancelled.status == "cancelled" and cancelled.progress_step < 100
    assert lanes.notifier.finished == [job.id]
    assert not (lanes.settings.data_dir / "images" / str(job.id)).exists()  # nothing came back


async def test_ray_unreachable_is_a_setup_error_that_says_what_to_do(closed_port):
    with pytest.raises(SetupError) as raised:
        connect(f"ray://127.0.0.1:{closed_port}")
    message = str(raised.value)
    assert f"Ray is unreachable at ray://127.0.0.1:{closed_port}" in message
    assert "ray start" in message and "BOOTHBOT_RAY_FALLBACK=local" in message
    assert UNREACHABLE.split("{")[0] in message


async def test_with_the_local_fallback_an_unreachable_ray_gives_one_local_worker(closed_port, tmp_path, caplog):
    settings = replace(Settings(), workers=f"ray://127.0.0.1:{closed_port}", ray_fallback="local",
                       data_dir=tmp_path, device="cpu")
    with caplog.at_level(logging.WARNING, logger="boothbot.worker"):
        workers = await start_ray_workers(settings)
    assert len(workers) == 1 and isinstance(workers[0], WorkerClient)
    assert "--device" in workers[0].argv and "cpu" in workers[0].argv
    assert "Ray is unreachable" in caplog.text and "BOOTHBOT_RAY_FALLBACK=local" in caplog.text


async def test_the_ray_settings_are_read_and_checked():
    settings = load_settings({"BOOTHBOT_RAY_CPU_WORKERS": "2", "BOOTHBOT_RAY_FALLBACK": "local"}, env_file=None)
    assert (settings.ray_cpu_workers, settings.ray_fallback) == (2, "local")
    with pytest.raises(SettingsError, match="BOOTHBOT_RAY_FALLBACK='gpu' is not allowed; choose one of: none, local"):
        load_settings({"BOOTHBOT_RAY_FALLBACK": "gpu"}, env_file=None)
