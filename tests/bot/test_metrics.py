"""The Prometheus endpoint (BOOTHBOT_METRICS_PORT): scraped over HTTP from a real `python -m bot run --no-discord`
process after it ran a job on the tiny model; a port in use or a bad value stops the start with one clear line;
`bot check` says where the metrics are served; the worker's events carry its GPU memory."""
from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bot import metrics
from bot.check import Report, check_metrics
from bot.dispatch.outbox import Outbox, RetryLater
from bot.dispatch.worker_client import WorkerClient, worker_command
from bot.jobs.ledger import Ledger
from bot.services.admin import AdminService
from bot.settings import SettingsError, load_settings
from bot.store.database import Store

REPO_ROOT = Path(__file__).resolve().parents[2]
GUILD, MEMBER, ADMIN = 111111111111111111, 2001, 2002
START_TIMEOUT_S = 180.0  # importing torch twice on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bot_env(data_dir: Path, model_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOTHBOT_", "HF_")) and k != "DISCORD_TOKEN"}
    env.update({"BOOTHBOT_DATA_DIR": str(data_dir), "BOOTHBOT_MODEL": str(model_dir), "BOOTHBOT_DEVICE": "cpu",
                "BOOTHBOT_DTYPE": "fp32", "BOOTHBOT_LOG_LEVEL": "info", "BOOTHBOT_METRICS_PORT": str(port),
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def start_bot(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "bot", "run", "--no-discord", "--env-file", "/nonexistent"],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def with_ledger(settings, action):
    async def run():
        store = await Store.open(settings.db_path)
        try:
            return await action(Ledger(store, settings=settings), store)
        finally:
            await store.close()
    return asyncio.run(run())


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} as Prometheus would parse the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_until(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the bot exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_a_running_bot_serves_its_jobs_queue_and_worker_as_prometheus_metrics(tmp_path, tiny_model_dir):
    port = free_port()
    env = bot_env(tmp_path / "data", tiny_model_dir, port)
    settings = load_settings(env, env_file=None)

    async def submit_imagine(ledger, store):
        job = await ledger.submit("imagine", MEMBER, GUILD, 5, {"prompt": "a red kite", "steps": 2, "count": 1,
                                                                "seed": 1})
        return job.id

    first = with_ledger(settings, submit_imagine)
    log = tmp_path / "bot.log"
    bot = start_bot(env, log)
    try:
        wait_until(lambda: with_ledger(settings, lambda ledger, store: ledger.get(first)).delivered_at,
                   "the /imagine job to be delivered", bot, log)
        ran = scrape(port)
        # One lane, named by its worker's label.
        (lane,) = {dict(labels)["lane"] for name, labels in ran if name == "boothbot_worker_up"}
        assert value(ran, "boothbot_jobs_ended_total", kind="imagine", outcome="succeeded") == 1
        assert value(ran, "boothbot_jobs_ended_total", kind="train", outcome="failed") == 0
        assert value(ran, "boothbot_job_run_seconds_count", kind="imagine") == 1
        assert value(ran, "boothbot_job_run_seconds_sum", kind="imagine") > 0
        assert value(ran, "boothbot_job_wait_seconds_count", kind="imagine") == 1
        assert value(ran, "boothbot_lane_busy_seconds_total", lane=lane) > 0
        assert value(ran, "boothbot_worker_up", lane=lane) == 1
        assert value(ran, "boothbot_worker_restarts_total", lane=lane) == 0
        assert value(ran, "boothbot_worker_info", lane=lane, device="cpu", dtype="float32",
                     model=str(tiny_model_dir)) == 1
        assert value(ran, "boothbot_deliveries_total", via="log") == 1
        assert value(ran, "boothbot_queue_jobs", kind="imagine", status="queued") == 0
        assert value(ran, "boothbot_queue_jobs", kind="imagine", status="running") == 0
        assert value(ran, "boothbot_deliveries_waiting") == 0
        assert value(ran, "boothbot_queue_paused") == 0
        assert value(ran, "process_resident_memory_bytes") > 0  # prometheus-client's own process metrics too

        # The queue as the database has it at the scrape: a paused queue with a job waiting.
        async def pause_then_submit(ledger, store):
            await AdminService(store, ledger, settings).pause(ADMIN)
            return await submit_imagine(ledger, store)

        with_ledger(settings, pause_then_submit)
        waiting = scrape(port)
        assert value(waiting, "boothbot_queue_paused") == 1
        assert value(waiting, "boothbot_queue_jobs", kind="imagine", status="queued") == 1
        assert value(waiting, "boothbot_queue_oldest_wait_seconds", kind="imagine") > 0
        assert value(waiting, "boothbot_queue_oldest_wait_seconds", kind="train") == 0

        # A worker killed under the bot is counted as a restart, and is up again once the new one is ready.
        worker_pid = int(re.findall(r"GPU worker ready: .* pid (\d+)", log.read_text())[-1])
        os.kill(worker_pid, signal.SIGKILL)
        wait_until(lambda: value(scrape(port), "boothbot_worker_restarts_total", lane=lane) == 1,
                   "the restart to be counted", bot, log)
        wait_until(lambda: value(scrape(port), "boothbot_worker_up", lane=lane) == 1,
                   "the new worker to be up", bot, log)
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(60) == 0
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
    text = log.read_text()
    assert f"Prometheus metrics at http://127.0.0.1:{port}/metrics" in text
    assert "Traceback" not in text


def test_a_metrics_port_in_use_stops_the_start_before_the_worker_with_one_line(tmp_path, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "bot", "run", "--no-discord", "--env-file", "/nonexistent"],
                              cwd=REPO_ROOT, env=bot_env(tmp_path / "data", tiny_model_dir, port),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (f"boothbot cannot start: cannot serve metrics at BOOTHBOT_METRICS_HOST=127.0.0.1 "
            f"BOOTHBOT_METRICS_PORT={port}: the port is in use") in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "GPU worker started" not in done.stderr + done.stdout


@pytest.mark.parametrize("raw, message", [
    ("metrics", "BOOTHBOT_METRICS_PORT='metrics' is not a whole number; allowed: 1..65535, or empty to serve no "
                "metrics"),
    ("70000", "BOOTHBOT_METRICS_PORT=70000 is out of range; allowed: 1..65535, or empty to serve no metrics"),
])
def test_a_bad_metrics_port_is_named_with_what_is_allowed(raw, message):
    with pytest.raises(SettingsError) as caught:
        load_settings({"BOOTHBOT_METRICS_PORT": raw}, env_file=None)
    assert str(caught.value) == message


def test_metrics_are_off_unless_a_port_is_set():
    assert load_settings({}, env_file=None).metrics_port is None
    assert load_settings({"BOOTHBOT_METRICS_PORT": ""}, env_file=None).metrics_port is None
    on = load_settings({"BOOTHBOT_METRICS_PORT": "9464", "BOOTHBOT_METRICS_HOST": "0.0.0.0"}, env_file=None)
    assert (on.metrics_host, on.metrics_port) == ("0.0.0.0", 9464)


def check_lines(env: dict[str, str]) -> list[tuple[str, str, str]]:
    report = Report(out=io.StringIO())
    check_metrics(report, load_settings(env, env_file=None))
    return report.lines


def test_bot_check_says_where_metrics_are_served_or_why_they_cannot_be():
    assert check_lines({}) == [("ok", "metrics", "off (set BOOTHBOT_METRICS_PORT to serve Prometheus metrics)")]
    port = free_port()
    assert check_lines({"BOOTHBOT_METRICS_PORT": str(port)}) == [
        ("ok", "metrics", f"Prometheus metrics will be served at http://127.0.0.1:{port}/metrics")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        ((status, topic, text),) = check_lines({"BOOTHBOT_METRICS_PORT": str(port)})
    assert (status, topic) == ("FAIL", "metrics")
    assert f"BOOTHBOT_METRICS_PORT={port}: the port is in use" in text


class FailsOnceNotifier:
    """The delivery cog's part, for the outbox: the first attempt meets a Discord outage, the second posts."""

    def __init__(self, ledger):
        self.ledger, self.attempts = ledger, 0

    async def job_progress(self, job, event):
        pass

    async def job_finished(self, job):
        self.attempts += 1
        if self.attempts == 1:
            raise RetryLater("503 Service Unavailable")
        await self.ledger.mark_delivered(job.id, via="dm", reason="the channel is gone")


async def test_delivery_retries_and_deliveries_are_counted(ledger):
    def counted() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("boothbot_delivery_failed_attempts_total") or 0.0,
                REGISTRY.get_sample_value("boothbot_deliveries_total", {"via": "dm"}) or 0.0)

    job = await ledger.submit("imagine", MEMBER, GUILD, 5, {"prompt": "a cat"})
    await ledger.claim_next()
    assert await ledger.succeed(job.id, {"images": []}, 1.0)
    failed_before, dm_before = counted()
    box = Outbox(ledger, FailsOnceNotifier(ledger))
    assert not await box.deliver(job.id)
    assert counted() == (failed_before + 1, dm_before)
    assert await box.deliver(job.id)
    assert await box.deliver(job.id)  # already delivered: not counted again
    assert counted() == (failed_before + 1, dm_before + 1)


def test_gpu_memory_from_worker_events_is_set_per_lane():
    metrics.worker_event("lane-under-test", {"event": "done", "job_id": 1,
                                             "gpu_memory": {"reserved": 5e9, "peak": 7e9, "total": 80e9}})
    metrics.worker_event("lane-under-test", {"event": "paused", "job_id": 2, "gpu_memory": None})  # no GPU: kept
    for field, expected in (("reserved", 5e9), ("peak", 7e9), ("total", 80e9)):
        assert REGISTRY.get_sample_value(f"boothbot_gpu_memory_{field}_bytes", {"lane": "lane-under-test"}) == expected


async def test_a_gpu_worker_reports_its_memory_when_ready_and_with_each_end(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent H200); a CPU worker's events have no gpu_memory")
    client = WorkerClient(worker_command(model=None, data_dir=tmp_path, threads=1))
    await client.start()
    try:
        ready = await client.wait_ready(START_TIMEOUT_S)
        end = await client.run(1, "selftest", {"seconds": 0.2}, timeout_s=60)
    finally:
        await client.stop()
    assert end["event"] == "done" and ready["device"].startswith("cuda")
    for memory in (ready["gpu_memory"], end["gpu_memory"]):
        assert 0 <= memory["reserved"] <= memory["peak"] <= memory["total"]
    assert end["gpu_memory"]["peak"] > 0  # the self-test's matmuls
