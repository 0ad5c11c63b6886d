"""The Prometheus endpoint, on when BOOTHBOT_METRICS_PORT is set: prometheus-client's HTTP server on a thread of its
own serves what bot/metrics.py counts, plus the queue as the database has it at the moment of each scrape.

The queue is read by a collector on the server's thread, through a read-only SQLite connection of its own: in WAL
mode it neither waits for nor holds up the bot's writes, and nothing of it runs on the bot's event loop.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bot import metrics
from bot.jobs.kinds import all_kinds
from bot.jobs.scheduler import PAUSED_KEY
from bot.settings import Settings
from trainer.contract.errors import SetupError

log = logging.getLogger("boothbot.metrics")

READ_TIMEOUT_S = 5.0
QUEUE_STATUSES = ("queued", "running")


class QueueCollector(Collector):
    """Queue depth per kind and state, the oldest wait, the delivery backlog and the pause flag, read at each scrape."""

    def __init__(self, db_path: Path, kinds: Sequence[str], clock=time.time):
        self.db_path = db_path
        self.kinds = tuple(kinds)
        self.clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            rows, undelivered, paused = self._read()
        except sqlite3.Error as e:  # no database yet, or it is locked for longer than a scrape should wait
            log.warning("metrics: could not read the queue from %s: %s", self.db_path, e)
            return iter(())
        depth, oldest, waiting, paused_flag = self._families()
        counts = {(kind, status): 0 for kind in self.kinds for status in QUEUE_STATUSES}
        first_created: dict[str, float] = {}
        for kind, status, count, created in rows:
            counts[(kind, status)] = count
            if created is not None:
                first_created[kind] = created
        for (kind, status), count in sorted(counts.items()):
            depth.add_metric([kind, status], count)
        now = self.clock()
        for kind in sorted({kind for kind, _ in counts}):
            oldest.add_metric([kind], max(0.0, now - first_created[kind]) if kind in first_created else 0.0)
        waiting.add_metric([], undelivered)
        paused_flag.add_metric([], 1.0 if paused else 0.0)
        return iter((depth, oldest, waiting, paused_flag))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("boothbot_queue_jobs", "Jobs waiting (queued) and on a worker (running), by kind",
                              labels=["kind", "status"]),
            GaugeMetricFamily("boothbot_queue_oldest_wait_seconds", "How long the oldest job of a kind that has "
                              "not started yet has waited (0: none waits)", labels=["kind"]),
            GaugeMetricFamily("boothbot_deliveries_waiting", "Finished jobs whose outcome is not delivered yet"),
            GaugeMetricFamily("boothbot_queue_paused", "1 while an admin has paused the queue (/queue admin pause)"),
        )

    def _read(self) -> tuple[list[tuple], int, bool]:
        uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=READ_TIMEOUT_S)) as conn:
            conn.execute("BEGIN")  # one snapshot for the three reads
            rows = conn.execute(
                "SELECT kind, status, COUNT(*), MIN(CASE WHEN status = 'queued' AND started_at IS NULL"
                " THEN created_at END) FROM jobs WHERE status IN ('queued', 'running') GROUP BY kind, status"
            ).fetchall()
            undelivered = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL"
                " AND status IN ('succeeded', 'failed', 'cancelled', 'interrupted')").fetchone()[0]
            paused = conn.execute("SELECT value FROM settings_kv WHERE key = ?", (PAUSED_KEY,)).fetchone()
            conn.rollback()
        return rows, undelivered, paused is not None and paused[0] == "1"


class MetricsServer:
    """The running endpoint; `stop()` closes it."""

    def __init__(self, settings: Settings):
        self.host, self.port = settings.metrics_host, settings.metrics_port
        self.collector = QueueCollector(settings.db_path, all_kinds())
        metrics.declare_kinds(all_kinds())
        try:
            self._httpd, self._thread = start_http_server(self.port, self.host)
        except OSError as e:
            raise SetupError(cannot_serve(self.host, self.port, e)) from e
        REGISTRY.register(self.collector)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        REGISTRY.unregister(self.collector)
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(settings: Settings) -> MetricsServer | None:
    """Serve the metrics when BOOTHBOT_METRICS_PORT is set (None otherwise). A port or host this machine cannot
    listen on raises SetupError naming the setting and what to do."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(settings)
    log.info("Prometheus metrics at %s", server.url)
    return server


def cannot_serve(host: str, port: int, error: OSError) -> str:
    where = f"BOOTHBOT_METRICS_HOST={host} BOOTHBOT_METRICS_PORT={port}"
    if isinstance(error, socket.gaierror):
        return (f"cannot serve metrics at {where}: {host!r} is not an address or host name this machine knows "
                f"({error.strerror}); use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its "
                "addresses")
    if error.errno == errno.EADDRINUSE:
        return (f"cannot serve metrics at {where}: the port is in use by another program (or another boothbot); "
                "choose a free port for BOOTHBOT_METRICS_PORT, or stop that program")
    if error.errno == errno.EACCES:
        return (f"cannot serve metrics at {where}: this user may not listen on port {port} (ports below 1024 need "
                "root); choose a port from 1024 up, e.g. 9464")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"cannot serve metrics at {where}: {host} is not an address of this machine; use 127.0.0.1, "
                "0.0.0.0 or one of its addresses")
    return f"cannot serve metrics at {where}: {error.strerror or error}"
