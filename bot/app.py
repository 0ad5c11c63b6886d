"""Wiring: Settings -> Store (migrations) -> services -> GPU workers -> dispatcher, in one `Services` container.

`python -m bot` calls `start_services(settings)` and hands the result to the Discord client (`BoothBot.services`),
where every cog finds it; the delivery cog attaches its notifier with `services.set_notifier(...)`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

from bot.services.admin import AdminService
from bot.services.base_models import BaseModels
from bot.services.concepts import ConceptService
from bot.dispatch.announcer import Notifier
from bot.dispatch.dispatcher import Dispatcher
from bot.services.gallery import Gallery
from bot.services.retention import PhotoRetention
from bot.jobs.ledger import Job, Ledger
from bot.settings import Settings
from bot.store.backups import Backups, BackupSchedule
from bot.store.database import Store
from bot.dispatch.worker_api import GpuWorker
from bot.dispatch.workers import build_workers
from trainer.contract.errors import require_writable_dir

log = logging.getLogger("boothbot")


@runtime_checkable
class QueuedJobNotifier(Protocol):
    """A notifier that also shows new jobs (the Discord delivery cog posts each one's status message)."""

    async def job_queued(self, job: Job) -> None: ...


@runtime_checkable
class ForgottenJobNotifier(Protocol):
    """A notifier that retires the status messages of jobs whose records /forget deleted."""

    async def jobs_forgotten(self, jobs: list[Job]) -> None: ...


@dataclass
class Services:
    settings: Settings
    store: Store
    ledger: Ledger
    concepts: ConceptService
    gallery: Gallery
    admin: AdminService
    worker: GpuWorker  # the first lane's; `workers` has them all
    dispatcher: Dispatcher
    notifier: Notifier | None = None
    backup_schedule: BackupSchedule | None = None
    retention: PhotoRetention | None = None  # the photo retention sweep, started by start_services
    _announcing: set[asyncio.Task] = field(default_factory=set, repr=False)

    @property
    def workers(self) -> list[GpuWorker]:
        """Every GPU worker, one per dispatcher lane (BOOTHBOT_WORKERS)."""
        return self.dispatcher.workers

    @cached_property
    def base_models(self) -> BaseModels:
        """The base models the bot offers, each server's default, and which one a job runs on."""
        return BaseModels(self.store, self.settings, self.worker)

    def set_notifier(self, notifier: Notifier | None) -> None:
        """Attach the announcer of progress and finished jobs; jobs that finished without one are announced now."""
        self.notifier = notifier
        self.dispatcher.set_notifier(notifier)

    async def job_submitted(self, job: Job) -> None:
        """A job was queued: the dispatcher looks at the queue now rather than at its next poll, and the notifier
        shows the job (so a new command that queues jobs has nothing to announce itself). The announcement runs on
        its own: the member's answer never waits for a channel post (Discord takes only a few per second and
        channel), and neither does the next submission."""
        self.dispatcher.wake()
        if isinstance(self.notifier, QueuedJobNotifier):
            task = asyncio.create_task(self._announce_queued(self.notifier, job), name=f"announce-job-{job.id}")
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    @staticmethod
    async def _announce_queued(notifier: QueuedJobNotifier, job: Job) -> None:
        try:
            await notifier.job_queued(job)
        except Exception:  # noqa: BLE001 - cosmetic: the job is queued whatever happens to its status message
            log.exception("job %s: could not post its status message", job.id)

    async def job_cancelled(self, job_id: int) -> None:
        """Announce a job cancelled before it ran, through the delivery outbox like every outcome; the dispatcher
        announces the jobs it ran, cancelled ones too."""
        job = await self.ledger.get(job_id)
        if job is not None and job.status == "cancelled":
            await self.dispatcher.announcer.finished(job_id)

    async def jobs_forgotten(self, jobs: list[Job]) -> None:
        """/forget deleted these waiting jobs' records: the notifier retires their status messages. Best effort:
        with the rows gone there is nothing left to retry from."""
        if isinstance(self.notifier, ForgottenJobNotifier):
            await self.notifier.jobs_forgotten(jobs)

    async def stop(self) -> None:
        """Let the running job or slice end (a short grace), stop the worker, close the database."""
        for task in list(self._announcing):
            task.cancel()
        await asyncio.gather(*self._announcing, return_exceptions=True)
        try:
            if self.backup_schedule is not None:
                await self.backup_schedule.stop()
            if self.retention is not None:
                await self.retention.stop()
            await self.dispatcher.stop()
        finally:
            try:
                await asyncio.gather(*(worker.stop() for worker in self.workers))
            finally:
                await self.store.close()
        log.info("stopped")


async def start_services(settings: Settings, *, worker: GpuWorker | None = None,
                         workers: list[GpuWorker] | None = None, notifier: Notifier | None = None) -> Services:
    """Open the database (applying migrations), build the services, start the GPU workers and the dispatcher.

    Returns at once: the workers load the base model in the background and each lane waits for its own.
    `worker` (one) or `workers` replace the ones built from BOOTHBOT_WORKERS (benchmarks and tests pick their command
    lines). A data directory or database the bot cannot use, or Ray asked for but missing, raises SetupError.
    """
    require_writable_dir(settings.data_dir, "BOOTHBOT_DATA_DIR")
    backups = Backups(settings.db_path, keep=settings.backups_keep)
    store = await Store.open(settings.db_path, lock_wait_s=settings.db_lock_wait_s, backups=backups)
    try:
        applied = await store.applied_migrations()
        log.info("database %s ready (schema version %s)", settings.db_path, applied[-1][0] if applied else 0)
        ledger = Ledger(store, settings=settings)
        concepts = ConceptService(store, settings.data_dir, model=settings.model)
        orphans = await concepts.remove_orphan_files()  # files a worker wrote after their concept was deleted
        if orphans:
            log.info("removed %d leftover concept folder(s) with no concept", orphans)
        gallery = Gallery(store)
        admin = AdminService(store, ledger, settings)
        workers = [worker] if worker is not None else workers or await build_workers(settings)
        dispatcher = Dispatcher(settings, ledger, concepts, gallery, workers, notifier=notifier)
        for one in workers:
            await one.start()
        await dispatcher.start()
    except BaseException:
        await asyncio.gather(*(one.stop() for one in workers or ()), return_exceptions=True)
        await store.close()
        raise
    log.info("%s starting with base model %s on %s; jobs run once one is ready",
             "GPU worker" if len(workers) == 1 else f"{len(workers)} GPU workers", settings.model,
             ", ".join(one.label for one in workers))
    schedule = BackupSchedule(backups)  # at once when the newest backup is a day old, then daily
    schedule.start()
    retention = PhotoRetention(store, settings.data_dir, settings.photo_retention_days)
    retention.start()  # its first sweep runs now, then every hour
    return Services(settings, store, ledger, concepts, gallery, admin, workers[0], dispatcher, backup_schedule=schedule,
                    retention=retention)
