"""A lane: one GPU worker and the runner that feeds it. The dispatcher runs one loop per lane; every lane claims from
the same ledger (atomic claims: two lanes never take the same job), so the fair order holds across lanes, a training's
next slice may run in whichever lane is free, and a dead worker stops only its own lane.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bot.dispatch.runner import Runner
from bot.dispatch.worker_api import GpuWorker

STARTING, READY, BUSY, RESTARTING, DOWN = "starting", "ready", "busy", "restarting", "down"


@dataclass(frozen=True)
class LaneStatus:
    """One lane as `/queue admin workers` and `bot check` show it."""
    label: str
    device: str          # what the worker reported (e.g. "cuda (NVIDIA H200)"), else its label
    state: str           # starting | ready | busy | restarting | down
    current_job_id: int | None
    jobs_run: int
    problem: str | None  # why it is down (the worker's `fatal` error), if known


class Lane:
    def __init__(self, worker: GpuWorker, runner: Runner):
        self.worker = worker
        self.runner = runner
        self.busy = False  # from a claim until its job (every slice) has been recorded
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return self.worker.label

    @property
    def can_take_work(self) -> bool:
        return self.worker.is_ready and not self.busy

    @property
    def state(self) -> str:
        if self.runner.current_job_id is not None:
            return BUSY
        if self.worker.is_ready:
            return READY
        if self.worker.last_fatal is not None:
            return DOWN
        if self.worker.ready_info is None:  # never ready yet: still loading, or every start so far failed
            return DOWN if self.worker.starts > 1 else STARTING
        return RESTARTING

    def status(self) -> LaneStatus:
        info = self.worker.ready_info or {}
        fatal = self.worker.last_fatal or {}
        return LaneStatus(self.label, info.get("device") or self.label, self.state, self.runner.current_job_id,
                          self.runner.jobs_run, fatal.get("error"))
