"""The soak's invariants, checked from what members were told, what the channel shows and what the database holds.

- no job lost: every job a member was told about ("queued as job N", a training's intake report) is in the database;
- none running forever: at the end, after the settle time, every job is finished;
- one outcome each: a finished job has exactly one member-visible outcome in the channel (0 = its result was lost,
  2+ = announced twice); a job marked delivered while the bot is down must already show its outcome;
- the SQLite file passes `PRAGMA integrity_check`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bench.soak.database import JobRow


@dataclass(frozen=True)
class Violation:
    rule: str            # lost | unfinished | no outcome | announced twice | integrity
    job_id: int | None
    what: str            # what happened, in words
    at: str              # when it was seen: "after kill 3 (bot)", "at the end"


RUNNING, DOWN, FINAL = "running", "down", "final"


def check_jobs(jobs: Mapping[int, JobRow], outcomes: Mapping[int, int], *, told_imagines: Iterable[int],
               told_tokens: Iterable[str], at: str, stage: str,
               history: Mapping[int, str] | None = None) -> list[Violation]:
    """`outcomes`: job id -> how many outcome messages the channel shows for it. `stage`: RUNNING (the bot is up:
    lost jobs and double announcements only), DOWN (the bot is down, nothing is on its way: a job marked delivered
    must show its outcome), FINAL (after the settle time: every job finished, each with its outcome). `history`:
    job id -> what the soak saw happen to it (a kill while its outcome post was in flight), added to the explanation.
    """
    violations = []

    def add(rule: str, job_id: int | None, what: str) -> None:
        extra = (history or {}).get(job_id) if job_id is not None else None
        violations.append(Violation(rule, job_id, f"{what}; {extra}" if extra else what, at))

    for job_id in sorted(set(told_imagines) - set(jobs)):
        add("lost", job_id, "the member was told 'queued as job N' but the database has no such job")
    trained = {job.token for job in jobs.values() if job.token}
    for token in sorted(set(told_tokens) - trained):
        add("lost", None, f"the training of `{token}` was reported queued but the database has no job for it")
    for job in sorted(jobs.values(), key=lambda j: j.id):
        seen = outcomes.get(job.id, 0)
        if seen > 1:
            add("announced twice", job.id, f"{job.kind} job {job.status}: {seen} outcome messages in the channel")
        elif seen == 0 and job.is_terminal and (stage == FINAL or (stage == DOWN and job.delivered)):
            marked = "marked delivered" if job.delivered else "not marked delivered"
            add("no outcome", job.id, f"{job.kind} job {job.status}, {marked}, but nothing in the channel says so")
        elif stage == FINAL and not job.is_terminal:
            add("unfinished", job.id, f"{job.kind} job still {job.status} at the end")
    return violations


def check_integrity(result: str, *, at: str) -> list[Violation]:
    return [] if result == "ok" else [Violation("integrity", None, f"PRAGMA integrity_check: {result}", at)]
