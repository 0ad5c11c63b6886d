"""What the bot counts for operators, as Prometheus metrics: one call per event, from the runner, the worker client,
the job endings and the outbox.

Recording is always on and costs a few dictionary updates; the values are only served when BOOTHBOT_METRICS_PORT is
set (bot/metrics_server.py, which also reads the queue's depth from the database at each scrape). The families live
in prometheus-client's default registry, next to its process_* and python_* ones. `lane` is a worker's label: one
dispatcher lane per GPU worker (today one, "local"). A worker on another machine reports through the same calls.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

if TYPE_CHECKING:
    from bot.jobs.ledger import Job

WAIT_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
RUN_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
disable_created_metrics()  # no *_created series: the process start time says the same

OUTCOMES = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled"}  # a worker's end event -> outcome

JOBS_ENDED = Counter("boothbot_jobs_ended", "Jobs that ran on a GPU worker and ended, by kind and the worker's "
                     "outcome", ["kind", "outcome"])
JOB_WAIT = Histogram("boothbot_job_wait_seconds", "From a job's submission to its first start on a worker, observed "
                     "when the job ends", ["kind"], buckets=WAIT_BUCKETS_S)
JOB_RUN = Histogram("boothbot_job_run_seconds", "GPU seconds a job used, all its training slices together, observed "
                    "when the job ends", ["kind"], buckets=RUN_BUCKETS_S)
LANE_BUSY = Counter("boothbot_lane_busy_seconds", "Seconds a lane's worker spent running jobs (counted at the end of "
                    "each request: one /imagine batch or one training slice); rate() of it is the busy ratio",
                    ["lane"])
WORKER_UP = Gauge("boothbot_worker_up", "1 while a lane's GPU worker has its model loaded and takes jobs", ["lane"])
WORKER_RESTARTS = Counter("boothbot_worker_restarts", "GPU workers that exited while the bot ran and were started "
                          "again (a crash, an out-of-memory kill)", ["lane"])
WORKER_INFO = Gauge("boothbot_worker_info", "A lane's worker as its last ready event described it (value 1)",
                    ["lane", "device", "dtype", "model"])
GPU_MEMORY = {
    field: Gauge(f"boothbot_gpu_memory_{field}_bytes", text, ["lane"])
    for field, text in (("reserved", "GPU memory the lane's worker holds (torch's caching allocator), after its last "
                                     "job or slice"),
                        ("peak", "The most GPU memory the lane's worker has held since it started"),
                        ("total", "The lane's GPU's memory"))
}
DELIVERY_RETRIES = Counter("boothbot_delivery_failed_attempts", "Attempts to post a finished job to Discord that "
                           "failed and will be tried again (Discord errors, rate limits, no connection)")
DELIVERED = Counter("boothbot_deliveries", "Finished jobs whose outcome was delivered, by where it went: channel, "
                    "dm (the channel refused it), log (no Discord) or nowhere (the DM was refused too)", ["via"])


def declare_kinds(kinds: Iterable[str]) -> None:
    """Start every kind's series at zero, so a rate over them works before the first job of a kind ends."""
    for kind in kinds:
        for outcome in OUTCOMES.values():
            JOBS_ENDED.labels(kind, outcome)
        JOB_WAIT.labels(kind)
        JOB_RUN.labels(kind)


def job_ended(job: Job, end: dict, seconds: float) -> None:
    """A job's run on a worker ended with `end` (done, failed, cancelled); `seconds`: this run's (last slice's)."""
    outcome = OUTCOMES.get(end["event"])
    if outcome is None:
        return
    JOBS_ENDED.labels(job.kind, outcome).inc()
    JOB_RUN.labels(job.kind).observe((job.gpu_seconds or 0.0) + seconds)
    if job.started_at is not None:
        JOB_WAIT.labels(job.kind).observe(max(0.0, job.started_at - job.created_at))


def lane_busy(lane: str, seconds: float) -> None:
    """The lane's worker ran a request (one job, one batch or one training slice) for `seconds`."""
    LANE_BUSY.labels(lane).inc(max(0.0, seconds))


def worker_event(lane: str, event: dict) -> None:
    """Every event a lane's worker sends: `ready` marks it up; any event with `gpu_memory` updates those gauges."""
    if event.get("event") == "ready":
        WORKER_UP.labels(lane).set(1)
        WORKER_RESTARTS.labels(lane)  # at zero from the first start, so increase() sees the first restart
        WORKER_INFO.labels(lane, str(event.get("device")), str(event.get("dtype")), str(event.get("model"))).set(1)
    for field, value in (event.get("gpu_memory") or {}).items():
        if field in GPU_MEMORY and isinstance(value, (int, float)):
            GPU_MEMORY[field].labels(lane).set(value)


def worker_exited(lane: str, *, restarting: bool) -> None:
    """A lane's worker process ended; `restarting`: it is started again (not the bot shutting down)."""
    WORKER_UP.labels(lane).set(0)
    if restarting:
        WORKER_RESTARTS.labels(lane).inc()


def delivery_failed_attempt() -> None:
    DELIVERY_RETRIES.inc()


def delivered(job: Job | None) -> None:
    """The outbox saw `job` delivered (None: it was deleted meanwhile, nothing to count)."""
    if job is not None and job.delivered_at is not None:
        DELIVERED.labels(job.delivered_via or "channel").inc()
