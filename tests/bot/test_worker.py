"""The GPU worker process and WorkerClient, with the real `python -m trainer worker` subprocess.

These use the worker's `selftest` job (real torch matmuls, cancellable between steps) and `--no-model`, so they do
not wait on model loading or the engines; tests/bot/test_main_process.py runs real engines on the tiny model.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

import pytest
import pytest_asyncio

from bot.dispatch.worker_client import CRASHED, WorkerClient, worker_command
from trainer.contract import protocol
from trainer.worker import NO_MODEL

pytestmark = pytest.mark.asyncio(loop_scope="module")

READY_TIMEOUT_S = 180  # importing torch on a loaded 2-core machine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("worker-data")
    client = WorkerClient(worker_command(model=None, data_dir=data_dir, threads=1), cancel_grace_s=1.5,
                          restart_delays_s=(0.1,))
    await client.start()
    await client.wait_ready(READY_TIMEOUT_S)
    yield client
    await client.stop()


class Progress:
    def __init__(self):
        self.events: list[dict] = []
        self.first = asyncio.Event()

    async def __call__(self, event: dict) -> None:
        self.events.append(event)
        self.first.set()


async def test_ready_event_describes_the_worker(worker):
    ready = await worker.wait_ready(READY_TIMEOUT_S)
    assert ready["event"] == "ready"
    assert ready["device"] == "cpu"
    assert ready["dtype"] == "float32"
    assert ready["model"] is None
    assert ready["pid"] == worker.pid


async def test_selftest_round_trip_with_progress(worker):
    progress = Progress()
    end = await worker.run(1, "selftest", {"seconds": 0.6, "step_s": 0.1, "size": 64}, on_progress=progress)
    assert end["event"] == "done" and end["job_id"] == 1
    assert end["result"]["steps"] == 6 and end["result"]["matmuls"] >= 6
    steps = [e["step"] for e in progress.events]
    assert steps[0] == 1 and steps[-1] == 6 and steps == sorted(steps)
    assert all(e["job_id"] == 1 and e["total"] == 6 for e in progress.events)


async def test_member_mistakes_come_back_as_their_message_and_the_worker_goes_on(worker):
    pid = worker.pid
    end = await worker.run(2, "selftest", {"seconds": -1})
    assert end == protocol.failed(2, "selftest seconds=-1 is not allowed; allowed: 0.0..3600.0", "")
    for kind in ("train", "imagine"):
        end = await worker.run(3, kind, {"prompt": "a photo of a dog"})
        assert end["event"] == "failed" and end["error"] == NO_MODEL
    assert (await worker.run(4, "selftest", {"seconds": 0.1}))["event"] == "done"
    assert worker.pid == pid


async def test_run_many_answers_every_job_of_the_batch(worker):
    progress = Progress()
    jobs = [{"job_id": 20 + i, "kind": "imagine", "params": {"prompt": "a photo of a dog"}} for i in range(3)]
    ends = await worker.run_many(jobs, on_progress=progress, timeout_s=30)
    assert sorted(ends) == [20, 21, 22]
    assert all(end["event"] == "failed" and end["error"] == NO_MODEL for end in ends.values())
    assert (await worker.run(23, "selftest", {"seconds": 0.1}))["event"] == "done"  # the stream is in step


async def test_cancel_stops_a_running_job_at_the_next_step(worker):
    progress = Progress()
    run = asyncio.create_task(worker.run(5, "selftest", {"seconds": 60, "step_s": 0.2}, on_progress=progress))
    await asyncio.wait_for(progress.first.wait(), 10)
    asked = time.monotonic()
    await worker.cancel(5)
    end = await asyncio.wait_for(run, 10)
    assert end == protocol.cancelled(5)
    assert time.monotonic() - asked < 2.0  # one 0.2 s step, not the remaining minute
    assert (await worker.run(6, "selftest", {"seconds": 0.1}))["event"] == "done"


async def test_stale_cancel_does_not_touch_a_later_run_of_that_job(worker):
    # A cancel that arrives after its job ended (or before it was sent) is ignored: job ids repeat, since a
    # training runs as several `run`s of the same id, and a new database starts counting again.
    await worker.cancel(7)
    end = await worker.run(7, "selftest", {"seconds": 0.3, "step_s": 0.1})
    assert end["event"] == "done"


async def test_job_past_its_timeout_is_stopped(worker):
    pid = worker.pid
    started = time.monotonic()
    end = await worker.run(8, "selftest", {"seconds": 60, "step_s": 0.2}, timeout_s=1.0)
    assert end["event"] == "failed"
    assert end["error"] == "Your job ran longer than the limit of 1 s and was stopped."
    assert time.monotonic() - started < 5
    assert worker.pid == pid  # it honoured the cancel, so the worker was not killed


async def test_job_that_ignores_cancel_past_its_timeout_gets_the_worker_killed(worker):
    pid, starts = worker.pid, worker.starts
    started = time.monotonic()
    # One 60-second step: the cancel can only be honoured after it, so the grace period (1.5 s) runs out.
    end = await worker.run(9, "selftest", {"seconds": 60, "step_s": 60}, timeout_s=1.0)
    assert end["event"] == "failed" and "limit of 1 s" in end["error"]
    assert "worker killed" in end["detail"]
    assert time.monotonic() - started < 6
    await worker.wait_ready(READY_TIMEOUT_S)
    assert worker.pid != pid and worker.starts == starts + 1
    assert (await worker.run(10, "selftest", {"seconds": 0.1}))["event"] == "done"


async def test_worker_killed_mid_job_fails_the_job_restarts_and_the_next_job_runs(worker):
    pid, starts = worker.pid, worker.starts
    progress = Progress()
    run = asyncio.create_task(worker.run(11, "selftest", {"seconds": 60, "step_s": 0.2}, on_progress=progress))
    await asyncio.wait_for(progress.first.wait(), 10)
    os.kill(pid, signal.SIGKILL)
    end = await asyncio.wait_for(run, 10)
    assert end["event"] == "failed" and end["job_id"] == 11
    assert end["error"] == CRASHED
    assert "SIGKILL" in end["detail"]
    await worker.wait_ready(READY_TIMEOUT_S)
    assert worker.pid not in (None, pid) and worker.starts == starts + 1
    end = await worker.run(12, "selftest", {"seconds": 0.2})
    assert end["event"] == "done"


async def test_worker_that_cannot_load_its_model_reports_why(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="boothbot.worker")
    missing = tmp_path / "no-such-model"
    client = WorkerClient(worker_command(model=str(missing), data_dir=tmp_path), restart_delays_s=(3600,))
    await client.start()
    try:
        assert await asyncio.wait_for(client.wait_first_start(), 30) is None
        assert client.last_fatal is not None
        assert str(missing) in client.last_fatal["error"] and "does not exist" in client.last_fatal["error"]
        assert not client.is_ready
    finally:
        await client.stop()
    # The plain error at ERROR, its traceback only at DEBUG; the worker exits by itself with its own code.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"the GPU worker cannot start: {client.last_fatal['error']}"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("Traceback" in m and "ModelNotFound" in m for m in debug)
    assert "the worker exited with code 3" in caplog.text


async def test_worker_exits_when_the_bot_goes_away(tmp_path):
    # The bot's end of stdin closes when it dies (even by SIGKILL): the running job stops and the worker exits.
    proc = await asyncio.create_subprocess_exec(
        *worker_command(model=None, data_dir=tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    ready = protocol.decode(await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S))
    assert ready["event"] == "ready"
    proc.stdin.write(protocol.encode(protocol.run(1, "selftest", {"seconds": 60, "step_s": 0.2})))
    await proc.stdin.drain()
    assert protocol.decode(await asyncio.wait_for(proc.stdout.readline(), 10))["event"] == "progress"
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
