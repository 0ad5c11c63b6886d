"""The worker protocol: plain dicts, one JSON object per line. Pure Python, so the bot process may import it.

Bot -> worker requests: run, run_many (several /imagine jobs served by one batched call), cancel, yield (a training
pauses at its next step boundary because someone waits), prefill (the GPU is idle: make class images ahead of need),
shutdown.
Worker -> bot events: ready, progress, paused, done, cancelled, failed, prefill (how far a prefill got), and fatal (the
worker cannot start, e.g. the base model does not load; it exits after sending it).
Files travel as absolute paths under the data directory. See docs/ARCHITECTURE.md for the params of each kind.
"""
from __future__ import annotations

import json
from enum import StrEnum
from typing import Any


class JobKind(StrEnum):
    """The job kinds both processes know. Each has an entry in the bot's registry (bot/jobs/kinds.py) and a handler
    in the worker (trainer/worker.py HANDLERS); `selftest` runs on the worker only (GPU checks, benchmarks, tests)."""
    TRAIN = "train"
    IMAGINE = "imagine"
    SELFTEST = "selftest"


KINDS = tuple(JobKind)
REQUESTS = ("run", "run_many", "cancel", "yield", "prefill", "shutdown")
# Kinds a `run_many` may hold: jobs that can share one denoising loop. The worker answers one end event per job.
BATCH_KINDS = (JobKind.IMAGINE,)
EVENTS = ("ready", "progress", "paused", "done", "cancelled", "failed", "prefill", "fatal", "models")
# Events after which the worker has finished with a job (for now: `paused` hands control back until the next run).
TERMINAL_EVENTS = ("done", "cancelled", "failed")
JOB_END_EVENTS = TERMINAL_EVENTS + ("paused",)

_REQUIRED = {
    ("op", "run"): ("job_id", "kind", "params"),
    ("op", "run_many"): ("jobs",),
    ("op", "cancel"): ("job_id",),
    ("op", "yield"): ("job_id",),
    ("op", "prefill"): ("classes",),
    ("op", "shutdown"): (),
    ("event", "ready"): ("device", "dtype", "model", "pid"),
    ("event", "progress"): ("job_id", "step", "total"),
    ("event", "paused"): ("job_id", "step", "total"),
    ("event", "done"): ("job_id", "result"),
    ("event", "cancelled"): ("job_id",),
    ("event", "failed"): ("job_id", "error"),
    ("event", "prefill"): ("state",),
    ("event", "fatal"): ("error",),
    ("event", "models"): ("models",),
}


class ProtocolError(ValueError):
    """A line that is not a valid protocol message."""


# --- requests (bot -> worker) ---
def run(job_id: int, kind: str, params: dict) -> dict:
    if kind not in KINDS:
        raise ProtocolError(f"unknown job kind {kind!r}; allowed: {', '.join(KINDS)}")
    return {"op": "run", "job_id": job_id, "kind": kind, "params": params}


def run_many(jobs: list[dict]) -> dict:
    """Several jobs in one request: `jobs` = [{"job_id", "kind", "params"}, ...], kinds from BATCH_KINDS only."""
    message = {"op": "run_many", "jobs": [{"job_id": j["job_id"], "kind": j["kind"], "params": j["params"]}
                                          for j in jobs]}
    check_run_many(message)
    return message


def check_run_many(message: dict) -> None:
    jobs = message.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise ProtocolError("run_many needs a non-empty list of jobs")
    seen = set()
    for job in jobs:
        if not isinstance(job, dict):
            raise ProtocolError(f"a run_many job is not an object: {job!r:.200}")
        missing = [k for k in ("job_id", "kind", "params") if k not in job]
        if missing:
            raise ProtocolError(f"a run_many job lacks {', '.join(missing)}")
        if job["kind"] not in BATCH_KINDS:
            raise ProtocolError(f"job kind {job['kind']!r} cannot run in a batch; allowed: {', '.join(BATCH_KINDS)}")
        if not isinstance(job["params"], dict):
            raise ProtocolError(f"the params of run_many job {job['job_id']!r} are not an object")
        if job["job_id"] in seen:
            raise ProtocolError(f"job {job['job_id']!r} appears twice in one run_many")
        seen.add(job["job_id"])


def job_ids(message: dict) -> list[int]:
    """The job ids a `run` or `run_many` request carries (none for a `prefill`: it belongs to no member's job)."""
    if message.get("op") == "prefill":
        return []
    if message.get("op") == "run_many":
        return [job["job_id"] for job in message["jobs"]]
    return [message["job_id"]]


def cancel(job_id: int) -> dict:
    return {"op": "cancel", "job_id": job_id}


def yield_training(job_id: int) -> dict:
    """Someone waits for the GPU: the running training checkpoints at its next step boundary and ends with `paused`
    (at least one step per run, so a training always gets on). Ignored for a job that is not running."""
    return {"op": "yield", "job_id": job_id}


def prefill(classes: list[str], *, count: int | None = None, resolution: int | None = None) -> dict:
    """Make the class images trainings of these classes will need, most wanted first, while nothing else runs: any
    other request stops it at the next sampler step; what is made stays (a set half made, even its batch half made,
    resumes next time).
    `count`/`resolution`: as a default training would use them when None."""
    return {"op": "prefill", "classes": list(classes), "count": count, "resolution": resolution}


def shutdown() -> dict:
    return {"op": "shutdown"}


# --- events (worker -> bot) ---
def ready(device: str, dtype: str, model: str | None, pid: int, *, native_side: int | None = None,
          safety_checker: bool | None = None, family: str | None = None, models: list[dict] | None = None) -> dict:
    """`native_side`: the model's training resolution, from which the allowed /imagine sizes follow
    (imagine_request.check_size); `safety_checker`: whether the model has one the safety filter can use;
    `family`: the model's family name (trainer/contract/families.py: "sd1" | "sdxl"). All None without a model."""
    event = {"event": "ready", "device": device, "dtype": dtype, "model": model, "pid": pid,
             "native_side": native_side, "safety_checker": safety_checker, "family": family}
    if models is not None:  # the base models jobs may name (`models` below); the default model's facts are above
        event["models"] = models
    return event


def progress(job_id: int, step: int, total: int, eta_s: float | None = None, loss: float | None = None,
             preview: str | None = None, stage: str | None = None, detail: str | None = None) -> dict:
    """`stage`/`detail` are optional words for the member (e.g. "class_images", "making comparison images 20/100")."""
    event = {"event": "progress", "job_id": job_id, "step": step, "total": total, "eta_s": eta_s, "loss": loss,
             "preview": preview}
    if stage:
        event["stage"] = stage
    if detail:
        event["detail"] = detail
    return event


def paused(job_id: int, step: int, total: int) -> dict:
    return {"event": "paused", "job_id": job_id, "step": step, "total": total}


def done(job_id: int, result: dict) -> dict:
    return {"event": "done", "job_id": job_id, "result": result}


def cancelled(job_id: int) -> dict:
    return {"event": "cancelled", "job_id": job_id}


def failed(job_id: int, error: str, detail: str = "") -> dict:
    return {"event": "failed", "job_id": job_id, "error": error, "detail": detail}


def prefill_state(state: str, *, class_name: str | None = None, done: int = 0, count: int = 0) -> dict:
    """`state`: "progress" (class_name: done/count images), "complete" (every set asked for is ready) or "stopped"
    (another request came first)."""
    return {"event": "prefill", "state": state, "class_name": class_name, "done": done, "count": count}


def models(entries: list[dict]) -> dict:
    """The worker's base models changed (one was loaded or evicted): `entries` as in `ready`'s "models", one
    {"name", "ref", "family", "resident", "problem"} per model the worker may load."""
    return {"event": "models", "models": entries}


def fatal(error: str, detail: str = "") -> dict:
    return {"event": "fatal", "error": error, "detail": detail}


# --- wire format ---
def encode(message: dict) -> bytes:
    """One line of UTF-8 JSON. NaN/inf (e.g. a diverged loss) are sent as null rather than as invalid JSON."""
    return (json.dumps(_finite(message), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict:
    """Parse and check one line; raises ProtocolError naming what is wrong."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        message = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"not JSON ({e.msg}): {line[:200]!r}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object: {line[:200]!r}")
    if "op" in message:
        key = ("op", message["op"])
    elif "event" in message:
        key = ("event", message["event"])
    else:
        raise ProtocolError(f"neither 'op' nor 'event' in {line[:200]!r}")
    if key not in _REQUIRED:
        raise ProtocolError(f"unknown {key[0]} {key[1]!r}")
    missing = [k for k in _REQUIRED[key] if k not in message]
    if missing:
        raise ProtocolError(f"{key[0]} {key[1]!r} lacks {', '.join(missing)}")
    if key == ("op", "run") and message["kind"] not in KINDS:
        raise ProtocolError(f"unknown job kind {message['kind']!r}; allowed: {', '.join(KINDS)}")
    if key == ("op", "run_many"):
        check_run_many(message)
    return message


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
