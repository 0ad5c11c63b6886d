"""The worker's table of job kinds (trainer/worker.py HANDLERS): a kind is one entry there, and both processes know
the same names (trainer.contract.protocol.JobKind)."""
from __future__ import annotations

import io

from bot.jobs import kinds
from trainer import worker as worker_module
from trainer.contract import protocol
from trainer.contract.errors import UserError
from trainer.contract.protocol import JobKind
from trainer.worker import EventWriter, JobControl, Worker


def events_of(stream: io.BytesIO) -> list[dict]:
    return [protocol.decode(line) for line in stream.getvalue().splitlines()]


def make_worker(tmp_path) -> tuple[Worker, io.BytesIO]:
    stream = io.BytesIO()
    return Worker(EventWriter(stream), JobControl(), pipe=None, device="cpu", model=None, data_dir=tmp_path), stream


def test_every_kind_has_a_worker_handler_and_the_bot_queues_only_those():
    assert set(worker_module.HANDLERS) == set(JobKind) == set(protocol.KINDS)
    assert set(kinds.all_kinds()) <= set(worker_module.HANDLERS)


def test_a_kind_is_one_handler_in_the_table(tmp_path, monkeypatch):
    def run_echo(worker, job_id, params, on_progress, should_stop):
        if params.get("mistake"):
            raise UserError("echo needs no mistake")
        on_progress({"step": 1, "total": 1})
        return protocol.done(job_id, {"echo": params["text"], "device": worker.device})

    monkeypatch.setitem(worker_module.HANDLERS, "echo", run_echo)
    worker, stream = make_worker(tmp_path)
    worker.run_job(1, "echo", {"text": "hello"})
    worker.run_job(2, "echo", {"mistake": True})
    progress, done, failed = events_of(stream)
    assert (progress["event"], progress["job_id"], progress["step"]) == ("progress", 1, 1)
    assert done == protocol.done(1, {"echo": "hello", "device": "cpu"})
    assert failed == protocol.failed(2, "echo needs no mistake", "")


def test_a_kind_without_a_handler_fails_its_job(tmp_path):
    worker, stream = make_worker(tmp_path)
    worker.run_job(3, "mine bitcoin", {})
    assert events_of(stream) == [protocol.failed(3, "Unknown job kind 'mine bitcoin'.")]
