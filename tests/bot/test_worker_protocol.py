"""The worker protocol's wire format, the worker's stdout guard, and how failures become member messages."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bot.dispatch.worker_client import describe_exit
from trainer.contract import protocol
from trainer.contract.errors import UserError
from trainer.worker import INTERNAL_ERROR, OUT_OF_MEMORY, describe_failure, is_out_of_memory


def test_every_message_round_trips_through_one_line():
    messages = [
        protocol.run(12, "train", {"concept_id": 3, "token": "sid", "photos_dir": "/data/concepts/3/photos"}),
        protocol.cancel(12),
        protocol.shutdown(),
        protocol.ready("cuda (NVIDIA H100 80GB HBM3)", "bfloat16", "stable-diffusion-v1-5/stable-diffusion-v1-5", 4),
        protocol.progress(12, 5, 400, eta_s=31.2, loss=0.12, preview="/data/previews/12.webp"),
        protocol.paused(12, 100, 400),
        protocol.done(12, {"images": ["/data/images/12/000.png"], "seed": 7, "parameters": "ä\nline two"}),
        protocol.cancelled(12),
        protocol.failed(12, "The GPU ran out of memory", "Traceback ..."),
        protocol.fatal("the base model could not be loaded"),
    ]
    for message in messages:
        line = protocol.encode(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert protocol.decode(line) == message


def test_non_finite_numbers_are_sent_as_null():
    line = protocol.encode(protocol.progress(1, 2, 3, eta_s=float("inf"), loss=float("nan")))
    event = protocol.decode(line)
    assert event["eta_s"] is None and event["loss"] is None


@pytest.mark.parametrize("line, complaint", [
    (b"Loading pipeline components...\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"job_id": 1}\n', "neither 'op' nor 'event'"),
    (b'{"event": "exploded", "job_id": 1}\n', "unknown event 'exploded'"),
    (b'{"event": "progress", "job_id": 1, "step": 2}\n', "lacks total"),
    (b'{"op": "run", "job_id": 1, "kind": "mine bitcoin", "params": {}}\n', "unknown job kind"),
])
def test_bad_lines_are_refused_with_a_reason(line, complaint):
    with pytest.raises(protocol.ProtocolError, match=complaint):
        protocol.decode(line)


def test_run_refuses_unknown_kinds():
    with pytest.raises(protocol.ProtocolError, match="allowed: train, imagine, selftest"):
        protocol.run(1, "upscale", {})


def test_run_many_round_trips_and_names_its_job_ids():
    message = protocol.run_many([{"job_id": 12, "kind": "imagine", "params": {"prompt": "a dog"}},
                                 {"job_id": 13, "kind": "imagine", "params": {}}])
    assert protocol.decode(protocol.encode(message)) == message
    assert protocol.job_ids(message) == [12, 13] and protocol.job_ids(protocol.run(7, "train", {})) == [7]


@pytest.mark.parametrize("jobs, complaint", [
    ([], "non-empty list"),
    ("12", "non-empty list"),
    ([{"job_id": 1, "kind": "imagine"}], "lacks params"),
    ([{"job_id": 1, "kind": "train", "params": {}}], "'train' cannot run in a batch; allowed: imagine"),
    ([{"job_id": 1, "kind": "imagine", "params": []}], "params of run_many job 1 are not an object"),
    ([{"job_id": 1, "kind": "imagine", "params": {}}, {"job_id": 1, "kind": "imagine", "params": {}}],
     "job 1 appears twice"),
    ([7], "not an object"),
])
def test_run_many_is_checked_on_both_sides(jobs, complaint):
    with pytest.raises(protocol.ProtocolError, match=complaint):
        protocol.decode(json.dumps({"op": "run_many", "jobs": jobs}))
    if isinstance(jobs, list) and all(isinstance(j, dict) and {"job_id", "kind", "params"} <= set(j) for j in jobs):
        with pytest.raises(protocol.ProtocolError, match=complaint):
            protocol.run_many(jobs)


def test_failures_become_messages_a_member_understands():
    assert describe_failure(UserError("Unknown concept token 'squidarth'."), "imagine") == (
        "Unknown concept token 'squidarth'.", "")

    import torch

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom)
    message, detail = describe_failure(oom, "train")
    assert message == OUT_OF_MEMORY and "Tried to allocate" in detail
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))

    try:
        {}["lora"]
    except KeyError as bug:
        message, detail = describe_failure(bug, "train")
    assert message == INTERNAL_ERROR
    assert "Traceback" in detail and "KeyError: 'lora'" in detail


def test_exit_descriptions_read_well():
    assert describe_exit(-9) == "the worker was killed by SIGKILL"
    assert describe_exit(-11) == "the worker was killed by SIGSEGV"
    assert describe_exit(1) == "the worker exited with code 1"


def test_stray_prints_in_the_worker_cannot_corrupt_the_event_stream():
    code = (
        "import os\n"
        "from trainer.worker import claim_stdout, EventWriter\n"
        "from trainer.contract import protocol\n"
        "events = claim_stdout()\n"
        "print('a library print')\n"
        "os.write(1, b'a C library write\\n')\n"
        "EventWriter(events).send(protocol.cancelled(3))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == protocol.encode(protocol.cancelled(3))
    assert b"a library print" in done.stderr and b"a C library write" in done.stderr
