"""Fixtures for bot/ state tests: real SQLite files in tmp_path, a clock the test moves by hand."""
from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_asyncio

from bot.services.admin import AdminService
from bot.services.concepts import ConceptService
from bot.services.gallery import Gallery
from bot.dispatch.worker_client import WorkerClient, worker_command
from bot.jobs.ledger import Ledger
from bot.settings import Settings
from bot.store.database import Store



class Clock:
    """Unix time that only moves when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return replace(Settings(), data_dir=tmp_path / "data", max_queued_jobs=3, trainings_per_day=2,
                   fair_window_hours=24.0)


@pytest.fixture
async def store(settings):
    store = await Store.open(settings.db_path)
    yield store
    await store.close()


@pytest.fixture
async def other_store(settings, store):
    """A second connection to the same file, as a second process would have."""
    other = await Store.open(settings.db_path)
    yield other
    await other.close()


@pytest.fixture
def ledger(store, clock, settings) -> Ledger:
    return Ledger(store, clock, settings=settings)


@pytest.fixture
def other_ledger(other_store, clock, settings) -> Ledger:
    return Ledger(other_store, clock, settings=settings)


@pytest.fixture
def concepts(store, clock, settings) -> ConceptService:
    return ConceptService(store, settings.data_dir, clock)


@pytest.fixture
def gallery(store, clock) -> Gallery:
    return Gallery(store, clock)


@pytest.fixture
def admin(store, ledger, settings, clock) -> AdminService:
    return AdminService(store, ledger, settings, clock)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_dir, tmp_path_factory):
    """A real GPU worker process on the tiny model (CPU), one per test module that asks for it."""
    client = WorkerClient(worker_command(model=str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("wd"),
                                         device="cpu", dtype="fp32", threads=1),
                          cancel_grace_s=10, restart_delays_s=(0.1,))
    await client.start()
    await client.wait_ready(120)
    yield client
    await client.stop()

