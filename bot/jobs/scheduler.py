"""Fair scheduling rules: who runs next, who may submit, where a job stands in the queue and when it should end.

The order: the owner with the fewest GPU-seconds in the sliding window (Settings.fair_window_hours) goes first,
then the higher priority (an admin bump), then the older job. Positions and ETAs come from simulating that rule
forward: each job taken from the queue adds its estimated duration to its owner's usage, exactly as running it
would, so a member with one job is placed behind at most one job of a member with twenty; with several lanes (GPU
workers) the ETAs count that many jobs running at once.

These functions read through a Store (or a Store inside `immediate()`); the Ledger owns the writes.
"""
from __future__ import annotations

import heapq
import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.errors import BannedError, LimitError
from bot.jobs.kinds import KINDS, UNMEASURED_DURATION_S
from trainer.contract.protocol import JobKind
from trainer.contract.durations import format_duration

if TYPE_CHECKING:
    from bot.jobs.ledger import Job
    from bot.settings import Settings
    from bot.store.database import Store

LIMIT_NAMES = ("max_queued_jobs", "trainings_per_day")
DAY_S = 24 * 3600.0
RECENT_JOBS_FOR_ESTIMATE = 20
PAUSED_KEY = "paused"


@dataclass(frozen=True)
class QueueEntry:
    job: Job
    position: int | None  # 1-based among queued jobs; None while running
    eta_s: float          # seconds from now until the job should be finished


# --- limits and bans at submit -------------------------------------------------------------------------------------

def default_limits(settings: Settings) -> dict[str, int]:
    return {"max_queued_jobs": settings.max_queued_jobs, "trainings_per_day": settings.trainings_per_day}


# The facts a submission is judged on. One set of SQL for both readers: the async Store/Reader (`check_submit`, the
# early check before uploads) and a plain sqlite3 connection inside the ledger's group commit (`submit_facts_now`).
_BAN_SQL = "SELECT reason FROM bans WHERE guild_id = ? AND member_id = ?"
_LIMITS_SQL = "SELECT role_id, name, value FROM limits WHERE guild_id = ?"
_ACTIVE_SQL = ("SELECT COUNT(*) FROM jobs WHERE guild_id = ? AND owner_id = ? AND status IN ('queued', 'running')")
# Trainings that used the GPU or still will; one that failed (not the member's doing) or was cancelled before it
# started is not counted.
_TRAININGS_SQL = (
    "SELECT created_at FROM jobs WHERE guild_id = ? AND owner_id = ? AND kind = 'train' AND created_at > ?"
    " AND (status IN ('queued', 'running', 'succeeded') OR (status = 'cancelled' AND started_at IS NOT NULL))"
    " ORDER BY created_at")


@dataclass(frozen=True)
class SubmitFacts:
    ban_reason: str | None        # None: not banned
    limit_rows: list              # (role_id, name, value) of the server
    active: int                   # the member's queued and running jobs
    recent_trainings: list[float] # created_at of the member's trainings in the last day (trainings only)


async def submit_facts(db: Store, *, kind: str, owner_id: int, guild_id: int, now: float) -> SubmitFacts:
    trainings = (await db.fetchall(_TRAININGS_SQL, (guild_id, owner_id, now - DAY_S))
                 if kind == JobKind.TRAIN else [])
    return SubmitFacts(await db.fetchval(_BAN_SQL, (guild_id, owner_id)),
                       [tuple(row) for row in await db.fetchall(_LIMITS_SQL, (guild_id,))],
                       await db.fetchval(_ACTIVE_SQL, (guild_id, owner_id)), [row[0] for row in trainings])


def submit_facts_now(conn: sqlite3.Connection, *, kind: str, owner_id: int, guild_id: int,
                     now: float) -> SubmitFacts:
    """`submit_facts` on a plain sqlite3 connection (run in a thread, inside the caller's transaction)."""
    trainings = (conn.execute(_TRAININGS_SQL, (guild_id, owner_id, now - DAY_S)).fetchall()
                 if kind == JobKind.TRAIN else [])
    ban = conn.execute(_BAN_SQL, (guild_id, owner_id)).fetchone()
    return SubmitFacts(None if ban is None else ban[0],
                       [tuple(row) for row in conn.execute(_LIMITS_SQL, (guild_id,)).fetchall()],
                       conn.execute(_ACTIVE_SQL, (guild_id, owner_id)).fetchone()[0], [row[0] for row in trainings])


def limits_from(rows: Iterable[Sequence], role_ids: Iterable[int], defaults: dict[str, int]) -> dict[str, int]:
    """A member's limits from the server's (role_id, name, value) rows: the most generous value among their roles
    that have one, else the server's value, else the bot's default (Settings)."""
    rows = list(rows)
    role_ids = [int(r) for r in role_ids if int(r) != 0]
    limits = dict(defaults)
    limits.update({name: value for role_id, name, value in rows if role_id == 0})
    for name in LIMIT_NAMES:
        by_role = [value for role_id, row_name, value in rows if row_name == name and role_id in role_ids]
        if by_role:
            limits[name] = max(by_role)
    return limits


async def limits_for(db: Store, guild_id: int, role_ids: Iterable[int], defaults: dict[str, int]) -> dict[str, int]:
    """A member's limits (`limits_from`), read through `db`."""
    return limits_from([tuple(row) for row in await db.fetchall(_LIMITS_SQL, (guild_id,))], role_ids, defaults)


async def ban_reason(db: Store, guild_id: int, member_id: int) -> str | None:
    """The ban's reason ('' when none was given), or None when the member is not banned."""
    return await db.fetchval(_BAN_SQL, (guild_id, member_id))


async def check_submit(db: Store, *, kind: str, owner_id: int, guild_id: int, role_ids: Iterable[int],
                       defaults: dict[str, int], now: float) -> None:
    """Raise BannedError or LimitError (messages for the member) if this member may not queue this job now."""
    facts = await submit_facts(db, kind=kind, owner_id=owner_id, guild_id=guild_id, now=now)
    refuse_submit(facts, kind=kind, role_ids=role_ids, defaults=defaults, now=now)


def refuse_submit(facts: SubmitFacts, *, kind: str, role_ids: Iterable[int], defaults: dict[str, int],
                  now: float) -> None:
    """Raise BannedError or LimitError if `facts` say this member may not queue this job now."""
    if facts.ban_reason is not None:
        raise BannedError("An admin of this server has blocked you from using the bot"
                          + (f" (reason: {facts.ban_reason})." if facts.ban_reason else "."))
    limits = limits_from(facts.limit_rows, role_ids, defaults)

    max_jobs, active = limits["max_queued_jobs"], facts.active
    if max_jobs == 0:
        raise LimitError("This server does not accept new jobs from you right now; ask an admin.")
    if active >= max_jobs:
        raise LimitError(f"You already have {_count(active, 'job')} waiting or running, the most this server "
                         "allows; wait for one to finish or cancel one with /queue.")

    if kind == JobKind.TRAIN:
        per_day = limits["trainings_per_day"]
        if per_day == 0:
            raise LimitError("Training is turned off for you on this server; ask an admin.")
        started = facts.recent_trainings
        if len(started) >= per_day:
            free_in = started[len(started) - per_day] + DAY_S - now
            raise LimitError(f"You have already started {_count(len(started), 'training')} in the last 24 hours, "
                             f"the most this server allows; you can train again in about {format_duration(free_in)}.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# --- pause ---------------------------------------------------------------------------------------------------------

async def is_paused(db: Store) -> bool:
    return await db.fetchval("SELECT value FROM settings_kv WHERE key = ?", (PAUSED_KEY,)) == "1"


async def set_paused(db: Store, paused: bool, now: float) -> bool:
    """Set the global pause flag; returns whether it changed."""
    before = await is_paused(db)
    await db.execute(
        "INSERT INTO settings_kv (key, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (PAUSED_KEY, "1" if paused else "0", now))
    return before != paused


# --- fairness ------------------------------------------------------------------------------------------------------

# GPU-seconds per owner in the window: finished or sliced jobs' recorded seconds, plus running time so far.
_USAGE_SQL = (
    "SELECT owner_id, SUM(gpu_seconds + CASE WHEN status = 'running' AND claimed_at IS NOT NULL"
    "                                       THEN MAX(0, :now - claimed_at) ELSE 0 END) AS used"
    " FROM jobs WHERE status = 'running' OR finished_at >= :since OR claimed_at >= :since"
    " GROUP BY owner_id")


async def usage_by_owner(db: Store, now: float, window_s: float) -> dict[int, float]:
    rows = await db.fetchall(_USAGE_SQL, {"now": now, "since": now - window_s})
    return {row["owner_id"]: row["used"] or 0.0 for row in rows}


async def next_job_id(db: Store, kinds: Sequence[str], now: float, window_s: float) -> int | None:
    """The queued job to run next: `fair_key` order, computed inside SQLite (no rows cross to Python)."""
    kind_params = {f"kind{i}": kind for i, kind in enumerate(kinds)}
    return await db.fetchval(
        f"WITH usage AS ({_USAGE_SQL})"
        " SELECT j.id FROM jobs j LEFT JOIN usage u ON u.owner_id = j.owner_id"
        f" WHERE j.status = 'queued' AND j.kind IN ({', '.join(':' + k for k in kind_params)})"
        " ORDER BY COALESCE(u.used, 0), j.priority DESC, j.created_at, j.id LIMIT 1",
        {"now": now, "since": now - window_s, **kind_params})


def fair_key(job: Job, used: dict[int, float]) -> tuple:
    """The scheduling order; `next_job_id` is the same order in SQL."""
    return (used.get(job.owner_id, 0.0), -job.priority, job.created_at, job.id)


def fair_order(queued: Iterable[Job], used: dict[int, float], estimates: dict[str, float], now: float) -> list[Job]:
    """The order the queue would run in, charging each job's estimated duration to its owner as it is taken."""
    by_owner: dict[int, list[Job]] = defaultdict(list)
    for job in queued:
        by_owner[job.owner_id].append(job)
    for jobs in by_owner.values():
        jobs.sort(key=lambda job: (-job.priority, job.created_at, job.id), reverse=True)  # pop() takes the first
    used = dict(used)
    # Only the owner just served changes its key, so a heap of each owner's next job stays valid.
    heads = [(fair_key(jobs[-1], used), owner) for owner, jobs in by_owner.items()]
    heapq.heapify(heads)
    order: list[Job] = []
    while heads:
        _, owner = heapq.heappop(heads)
        job = by_owner[owner].pop()
        order.append(job)
        used[owner] = used.get(owner, 0.0) + remaining_s(job, estimates, now)
        if by_owner[owner]:
            heapq.heappush(heads, (fair_key(by_owner[owner][-1], used), owner))
    return order


# --- durations and ETA ---------------------------------------------------------------------------------------------

def default_duration_s(kind: str) -> float:
    """Used until enough jobs of the kind have finished to measure (bot/jobs/kinds.py)."""
    spec = KINDS.get(kind)
    return UNMEASURED_DURATION_S if spec is None else spec.default_duration_s


async def estimated_durations(db: Store) -> dict[str, float]:
    """Median GPU-seconds of the most recent successful jobs of each kind (defaults until there are some)."""
    estimates = {kind: default_duration_s(kind) for kind in KINDS}
    for kind in KINDS:
        rows = await db.fetchall(
            "SELECT CASE WHEN gpu_seconds > 0 THEN gpu_seconds ELSE finished_at - started_at END AS seconds"
            " FROM jobs WHERE status = 'succeeded' AND kind = ? ORDER BY finished_at DESC LIMIT ?",
            (kind, RECENT_JOBS_FOR_ESTIMATE))
        measured = [row["seconds"] for row in rows if row["seconds"] is not None and row["seconds"] > 0]
        if measured:
            estimates[kind] = float(statistics.median(measured))
    return estimates


def remaining_s(job: Job, estimates: dict[str, float], now: float) -> float:
    """Seconds of GPU time this job still needs, best guess."""
    estimate = estimates.get(job.kind, default_duration_s(job.kind))
    if job.status == "running":
        if job.progress_eta_s is not None and job.progress_at is not None:
            return max(0.0, job.progress_eta_s - (now - job.progress_at))
        done = job.gpu_seconds + (now - job.claimed_at if job.claimed_at else 0.0)
        return max(0.0, estimate - done)
    if job.progress_step and job.progress_total and job.gpu_seconds > 0:
        # a training between slices: its own pace so far
        return job.gpu_seconds * max(0, job.progress_total - job.progress_step) / job.progress_step
    if job.gpu_seconds > 0:
        return max(estimate - job.gpu_seconds, 0.1 * estimate)
    return estimate


def plan(running: Sequence[Job], queued: Sequence[Job], used: dict[int, float], estimates: dict[str, float],
         now: float, lanes: int = 1) -> list[QueueEntry]:
    """Running jobs first, then the queue in fair order, each with its position and ETA.

    `lanes` workers run jobs at the same time (bot/dispatch/lanes.py): each waiting job goes to the lane that frees
    first. Jobs running at the same time in one lane are one batch (several /imagine jobs in one denoising loop): the
    lane waits for the longest of them, so the lanes are taken to free as the `lanes` longest running jobs end."""
    lanes = max(1, lanes)
    entries: list[QueueEntry] = []
    remaining_running = []
    for job in sorted(running, key=lambda j: (j.claimed_at or 0.0, j.id)):
        remaining = remaining_s(job, estimates, now)
        remaining_running.append(remaining)
        entries.append(QueueEntry(job, None, remaining))
    free_at = sorted(remaining_running, reverse=True)[:lanes]
    free_at += [0.0] * (lanes - len(free_at))
    heapq.heapify(free_at)
    for position, job in enumerate(fair_order(queued, used, estimates, now), start=1):
        ends = heapq.heappop(free_at) + remaining_s(job, estimates, now)
        heapq.heappush(free_at, ends)
        entries.append(QueueEntry(job, position, ends))
    return entries
