"""The job ledger: every job's status, guarded transitions, atomic claims, restart recovery, the delivery outbox.

Statuses: queued → running → succeeded | failed | cancelled, and interrupted (restart). A terminal job never changes
(the UPDATEs below only match the statuses they may leave, and a trigger in the schema refuses the rest);
running → queued only through `requeue` (a training slice ended) or `recover_at_start`.

Delivery is an outbox (migration 0002): a terminal job with `delivered_at` NULL still has to be announced.
`delivered_at` is set only once every part of its outcome was confirmed (`confirm_part`); failed attempts are
counted with a time for the next one (`delivery_failed`), and `delivered_via` / `delivery_error` say where the
outcome went and why not to its channel.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from bot.jobs import scheduler
from bot.jobs.kinds import all_kinds, kind_of
from bot.errors import NotFound, PermissionDenied
from bot.jobs.scheduler import QueueEntry
from bot.settings import Settings
from bot.jobs.queue_cache import QueueCache, QueuePlan
from bot.store.database import Reader, Store
from bot.store.group_commit import GroupCommit
from trainer.contract.protocol import JobKind

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = "succeeded", "failed", "cancelled", "interrupted"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, INTERRUPTED})
_TERMINAL_SQL = "('succeeded', 'failed', 'cancelled', 'interrupted')"

# A resumable job (a training) that was running when the bot died goes on from its checkpoint, but not forever: one
# that takes the bot down every time stops after this many restarts.
MAX_RECOVERIES = 3


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    owner_id: int
    guild_id: int
    channel_id: int | None
    message_id: int | None
    params: dict
    status: str
    priority: int
    attempts: int
    error: str | None
    result: dict | None
    progress_step: int | None
    progress_total: int | None
    gpu_seconds: float
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    delivered_at: float | None
    # beyond the documented shape
    claimed_at: float | None = None       # latest claim (started_at is the first)
    progress_eta_s: float | None = None
    progress_at: float | None = None
    preview: str | None = None
    cancelled_by: int | None = None
    delivery_attempts: int = 0            # failed delivery attempts (migration 0002)
    delivery_next_at: float | None = None
    delivery_error: str | None = None
    delivered_via: str | None = None      # channel | dm | followup | log | nowhere

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(zip(row.keys(), row))
        values = {name: values[name] for name in _JOB_FIELDS}
        values["params"] = json.loads(values["params"] or "{}")
        values["result"] = None if values["result"] is None else json.loads(values["result"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


_JOB_FIELDS = tuple(f.name for f in fields(Job))

_INSERT_JOB_SQL = (
    "INSERT INTO jobs (kind, owner_id, guild_id, channel_id, message_id, params, priority, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *")
_TOUCH_MEMBER_SQL = (
    "INSERT INTO members (guild_id, member_id, first_seen, last_seen) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (guild_id, member_id) DO UPDATE SET last_seen = excluded.last_seen")


@dataclass(frozen=True)
class _Submission:
    kind: str
    owner_id: int
    guild_id: int
    channel_id: int | None
    params_json: str
    priority: int
    message_id: int | None
    role_ids: tuple[int, ...]
    at: float  # when it was asked for: the job's created_at


class Ledger:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time, *, settings: Settings | None = None):
        self.store = store
        self.clock = clock
        self.settings = settings or Settings()
        self.lanes = 1  # how many jobs run at once (one per GPU worker); the dispatcher sets it, the ETAs use it
        self.queue = QueueCache(store, self._work_out_queue, self._now)
        self.submissions = GroupCommit(store, self._write_submission)

    def _now(self) -> float:
        return self.clock()

    @property
    def window_s(self) -> float:
        return self.settings.fair_window_hours * 3600.0

    # --- reading ----------------------------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job | None:
        async with self.store.read() as db:
            row = await db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else Job.from_row(row)

    async def _require(self, job_id: int) -> Job:
        job = await self.get(job_id)
        if job is None:
            raise NotFound(f"There is no job #{job_id}.")
        return job

    async def list_jobs(self, guild_id: int | None = None, owner_id: int | None = None,
                        statuses: Iterable[str] | None = None, limit: int = 50) -> list[Job]:
        """Newest first."""
        where, params = ["1"], []
        if guild_id is not None:
            where.append("guild_id = ?")
            params.append(guild_id)
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        if statuses is not None:
            statuses = list(statuses)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        async with self.store.read() as db:
            rows = await db.fetchall(
                f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [Job.from_row(row) for row in rows]

    async def _jobs_with_status(self, status: str, kinds: Sequence[str] | None = None, *,
                                db: Reader | Store | None = None) -> list[Job]:
        kinds = all_kinds() if kinds is None else tuple(kinds)
        rows = await (db or self.store).fetchall(
            f"SELECT * FROM jobs WHERE status = ? AND kind IN ({','.join('?' * len(kinds))})", (status, *kinds))
        return [Job.from_row(row) for row in rows]

    # --- submit -----------------------------------------------------------------------------------------------------

    async def check_submit(self, kind: str, owner_id: int, guild_id: int, *, role_ids: Iterable[int] = ()) -> None:
        """Raise BannedError / LimitError now, before the member uploads photos; `submit` checks again."""
        async with self.store.read() as db:
            await scheduler.check_submit(db, kind=kind, owner_id=owner_id, guild_id=guild_id, role_ids=role_ids,
                                         defaults=scheduler.default_limits(self.settings), now=self.clock())

    async def submit(self, kind: str, owner_id: int, guild_id: int, channel_id: int | None, params: dict, *,
                     priority: int = 0, interaction_message_id: int | None = None,
                     role_ids: Iterable[int] = ()) -> Job:
        """Queue a job. Raises BannedError / LimitError (scheduler rules; `role_ids` pick the member's limits).

        Submissions that arrive together are written in one transaction (bot/store/group_commit.py), each checked
        against the limits after the ones before it, so a burst costs one hand-off to the database per group."""
        kind_of(kind)  # ValueError for a kind the bot does not know
        return await self.submissions.submit(_Submission(
            kind, owner_id, guild_id, channel_id, json.dumps(params), priority, interaction_message_id,
            tuple(int(r) for r in role_ids), self.clock()))

    def _write_submission(self, conn: sqlite3.Connection, s: _Submission) -> Job:
        """One submission, inside the group's transaction (in the database's worker thread)."""
        facts = scheduler.submit_facts_now(conn, kind=s.kind, owner_id=s.owner_id, guild_id=s.guild_id, now=s.at)
        scheduler.refuse_submit(facts, kind=s.kind, role_ids=s.role_ids,
                                defaults=scheduler.default_limits(self.settings), now=s.at)
        conn.execute(_TOUCH_MEMBER_SQL, (s.guild_id, s.owner_id, s.at, s.at))
        rows = conn.execute(_INSERT_JOB_SQL, (s.kind, s.owner_id, s.guild_id, s.channel_id, s.message_id,
                                              s.params_json, s.priority, s.at)).fetchall()
        return Job.from_row(rows[0])

    async def set_message(self, job_id: int, channel_id: int | None, message_id: int | None) -> None:
        """Where the job's status message lives (posted after submit, once the job id is known)."""
        await self.store.execute("UPDATE jobs SET channel_id = ?, message_id = ? WHERE id = ?",
                                 (channel_id, message_id, job_id))

    # --- claim ------------------------------------------------------------------------------------------------------

    async def claim_next(self, kinds: Sequence[str] | None = None) -> Job | None:
        """Take the next job (of `kinds`, default every kind) in fair order and mark it running; None when the queue
        is empty or paused."""
        kinds = all_kinds() if kinds is None else tuple(kinds)
        async with self.store.immediate() as db:
            if await scheduler.is_paused(db):
                return None
            now = self.clock()
            job_id = await scheduler.next_job_id(db, kinds, now, self.window_s)
            return None if job_id is None else await self._start(db, job_id, now)

    async def claim(self, job_id: int) -> Job | None:
        """Claim one specific queued job (the next slice of a training); None if it is not queued or paused."""
        async with self.store.immediate() as db:
            if await scheduler.is_paused(db):
                return None
            return await self._start(db, job_id, self.clock())

    async def claim_matching(self, accept: Callable[[Job, list[Job]], bool], limit: int,
                             kinds: Sequence[str] = (JobKind.IMAGINE,)) -> list[Job]:
        """Claim up to `limit` queued jobs of `kinds`, taken in the scheduler's fair order, that `accept(job, taken)`
        lets join the ones taken so far (e.g. /imagine jobs that can share one batch). One transaction, so two
        claimers never take the same job. [] when the queue is paused."""
        async with self.store.immediate() as db:
            if limit < 1 or await scheduler.is_paused(db):
                return []
            now = self.clock()
            queued = await self._jobs_with_status(QUEUED, kinds)
            used = await scheduler.usage_by_owner(db, now, self.window_s)
            estimates = await scheduler.estimated_durations(db)
            taken: list[Job] = []
            for job in scheduler.fair_order(queued, used, estimates, now):
                if len(taken) >= limit:
                    break
                if accept(job, taken):
                    started = await self._start(db, job.id, now)
                    if started is not None:
                        taken.append(started)
            return taken

    async def claim_preferred(self, rank: Callable[[Job], float], among: int,
                              kinds: Sequence[str] | None = None) -> Job | None:
        """Claim one of the first `among` queued jobs (of `kinds`) in fair order: the one `rank` puts highest, the
        fairer one on a tie. The dispatcher's lane affinity: `among` is how many lanes are free now, so each of those
        jobs starts now whichever lane takes it, and the choice costs no one their turn."""
        if among <= 1:
            return await self.claim_next(kinds)
        kinds = all_kinds() if kinds is None else tuple(kinds)
        async with self.store.immediate() as db:
            if await scheduler.is_paused(db):
                return None
            now = self.clock()
            queued = await self._jobs_with_status(QUEUED, kinds)
            used = await scheduler.usage_by_owner(db, now, self.window_s)
            estimates = await scheduler.estimated_durations(db)
            head = scheduler.fair_order(queued, used, estimates, now)[:among]
            if not head:
                return None
            return await self._start(db, max(head, key=rank).id, now)  # max keeps the first of equals

    async def _start(self, db: Store, job_id: int, now: float) -> Job | None:
        changed = await db.execute(
            "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), claimed_at = ?"
            " WHERE id = ? AND status = 'queued'", (now, now, job_id))
        return await self.get(job_id) if changed else None

    # --- while running ----------------------------------------------------------------------------------------------

    async def record_progress(self, job_id: int, step: int, total: int, eta_s: float | None = None,
                              preview: str | None = None) -> bool:
        return await self.store.execute(
            "UPDATE jobs SET progress_step = ?, progress_total = ?, progress_eta_s = ?, progress_at = ?,"
            " preview = COALESCE(?, preview) WHERE id = ? AND status = 'running'",
            (step, total, eta_s, self.clock(), preview, job_id)) == 1

    async def cancel_requested(self, job_id: int) -> bool:
        async with self.store.read() as db:
            return bool(await db.fetchval("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)))

    # --- endings (gpu_seconds: this run's seconds, added to what earlier slices recorded) ----------------------------

    async def succeed(self, job_id: int, result: dict, gpu_seconds: float) -> bool:
        return await self._finish(job_id, SUCCEEDED, gpu_seconds, result=json.dumps(result))

    async def fail(self, job_id: int, error: str, gpu_seconds: float = 0.0) -> bool:
        return await self._finish(job_id, FAILED, gpu_seconds, error=error)

    async def confirm_cancelled(self, job_id: int, gpu_seconds: float = 0.0) -> bool:
        """The worker stopped a running job after a cancel request (its `cancelled` event)."""
        return await self._finish(job_id, CANCELLED, gpu_seconds)

    async def _finish(self, job_id: int, status: str, gpu_seconds: float, *, result: str | None = None,
                      error: str | None = None) -> bool:
        return await self.store.execute(
            "UPDATE jobs SET status = ?, result = ?, error = ?, gpu_seconds = gpu_seconds + ?, finished_at = ?"
            " WHERE id = ? AND status = 'running'",
            (status, result, error, gpu_seconds, self.clock(), job_id)) == 1

    async def requeue(self, job_id: int, gpu_seconds: float = 0.0, *, count_attempt: bool = False) -> bool:
        """A training slice ended (worker `paused`): running → queued, keeping progress, so others get a turn.
        `count_attempt`: the worker died under it instead, and it goes on from its last checkpoint; that counts as
        one of its MAX_RECOVERIES, as a restart of the bot does.

        If a cancel was requested meanwhile the job becomes cancelled instead and this returns False.
        """
        async with self.store.immediate() as db:
            now = self.clock()
            if await db.execute(
                    "UPDATE jobs SET status = 'cancelled', gpu_seconds = gpu_seconds + ?, finished_at = ?"
                    " WHERE id = ? AND status = 'running' AND cancel_requested = 1", (gpu_seconds, now, job_id)):
                return False
            return await db.execute(
                "UPDATE jobs SET status = 'queued', gpu_seconds = gpu_seconds + ?, progress_eta_s = NULL,"
                " attempts = attempts + ? WHERE id = ? AND status = 'running'",
                (gpu_seconds, int(count_attempt), job_id)) == 1

    async def cancel(self, job_id: int, by_user_id: int, *, force: bool = False) -> str:
        """"cancelled" (it was queued), "requested" (running: it stops at the next step boundary),
        "already requested" (running, someone asked first) or "already finished".

        Only the owner may cancel unless `force` (admins); otherwise PermissionDenied. NotFound for no such job.
        """
        async with self.store.immediate() as db:
            job = await self._require(job_id)
            if not force and job.owner_id != by_user_id:
                raise PermissionDenied(f"Job #{job_id} is not yours, so you cannot cancel it.")
            return await cancel_job(db, job_id, by_user_id, self.clock())

    # --- restart and delivery ---------------------------------------------------------------------------------------

    async def recover_at_start(self) -> list[Job]:
        """Call once at start, before the dispatcher runs: jobs left running by a dead bot go back to the queue
        (resumable kinds: a training goes on from its checkpoint) or end as interrupted. Returns them in their new
        state."""
        async with self.store.immediate() as db:
            now = self.clock()
            recovered = []
            for job in await self._jobs_with_status(RUNNING):
                if job.cancel_requested:
                    await db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?",
                                     (now, job.id))
                elif kind_of(job.kind).resumable and job.attempts < MAX_RECOVERIES:
                    await db.execute("UPDATE jobs SET status = 'queued', attempts = attempts + 1,"
                                     " progress_eta_s = NULL WHERE id = ?", (job.id,))
                else:
                    message = kind_of(job.kind).interrupted(job)
                    await db.execute("UPDATE jobs SET status = 'interrupted', error = ?, finished_at = ?,"
                                     " attempts = attempts + 1 WHERE id = ?", (message, now, job.id))
                recovered.append(await self.get(job.id))
            return recovered

    async def undelivered(self, *, due_by: float | None = None) -> list[Job]:
        """Finished jobs whose outcome is not delivered yet, oldest first; with `due_by`, only those whose next
        attempt is due by then."""
        due = "" if due_by is None else " AND (delivery_next_at IS NULL OR delivery_next_at <= ?)"
        rows = await self.store.fetchall(
            f"SELECT * FROM jobs WHERE delivered_at IS NULL AND status IN {_TERMINAL_SQL}{due}"
            " ORDER BY finished_at, id", () if due_by is None else (due_by,))
        return [Job.from_row(row) for row in rows]

    async def next_delivery_at(self) -> float | None:
        """When the earliest waiting delivery retry is due (None: no job waits for a retry)."""
        return await self.store.fetchval(
            f"SELECT MIN(delivery_next_at) FROM jobs WHERE delivered_at IS NULL AND status IN {_TERMINAL_SQL}")

    async def confirmed_parts(self, job_id: int, route: str) -> dict[int, int]:
        """The parts of the job's outcome Discord confirmed on `route`: {part number: message id}."""
        rows = await self.store.fetchall(
            "SELECT part, message_id FROM delivery_parts WHERE job_id = ? AND route = ?", (job_id, route))
        return {row["part"]: row["message_id"] for row in rows}

    async def confirm_part(self, job_id: int, route: str, part: int, message_id: int) -> None:
        """Discord confirmed one message of the outcome: a restart resumes after it."""
        await self.store.execute(
            "INSERT OR IGNORE INTO delivery_parts (job_id, route, part, message_id, confirmed_at)"
            " VALUES (?, ?, ?, ?, ?)", (job_id, route, part, message_id, self.clock()))

    async def delivery_failed(self, job_id: int, error: str, retry_in_s: float) -> int:
        """An attempt failed for a reason that may pass (Discord down, rate limits, no connection): count it and
        try again after `retry_in_s`. Returns the attempts so far."""
        async with self.store.immediate() as db:
            await db.execute(
                "UPDATE jobs SET delivery_attempts = delivery_attempts + 1, delivery_next_at = ?, delivery_error = ?"
                " WHERE id = ? AND delivered_at IS NULL", (self.clock() + retry_in_s, error[:500], job_id))
            return await db.fetchval("SELECT delivery_attempts FROM jobs WHERE id = ?", (job_id,)) or 0

    async def mark_delivered(self, job_id: int, via: str = "channel", reason: str | None = None) -> bool:
        """The outcome reached `via` (every part confirmed): True exactly once per finished job. `reason`: why it
        did not go to the job's channel (kept for admins); None keeps the last error recorded, if any."""
        return await self.store.execute(
            "UPDATE jobs SET delivered_at = ?, delivered_via = ?, delivery_next_at = NULL,"
            " delivery_error = COALESCE(?, CASE WHEN ? = 'channel' THEN NULL ELSE delivery_error END)"
            f" WHERE id = ? AND delivered_at IS NULL AND status IN {_TERMINAL_SQL}",
            (self.clock(), via, reason, via, job_id)) == 1

    async def delivery_problems(self, guild_id: int, limit: int = 10) -> list[Job]:
        """Newest first: finished jobs of the server whose outcome did not reach their channel (yet): waiting for a
        retry, sent to the owner elsewhere, or nowhere."""
        rows = await self.store.fetchall(
            f"SELECT * FROM jobs WHERE guild_id = ? AND status IN {_TERMINAL_SQL} AND delivery_error IS NOT NULL"
            " AND (delivered_at IS NULL OR delivered_via IN ('dm', 'followup', 'nowhere'))"
            " ORDER BY finished_at DESC, id DESC LIMIT ?", (guild_id, limit))
        return [Job.from_row(row) for row in rows]

    # --- queue position and ETA -------------------------------------------------------------------------------------

    async def queue_view(self, guild_id: int | None = None) -> list[QueueEntry]:
        """Running jobs, then queued jobs in the order they should run, with 1-based positions and ETAs (seconds
        from now). Positions count the whole bot's queue (one GPU serves every server); `guild_id` filters.
        Worked out once per change of the database and shared (bot/jobs/queue_cache.py)."""
        entries = (await self.queue.plan()).entries_at(self.clock())
        return [e for e in entries if guild_id is None or e.job.guild_id == guild_id]

    async def _work_out_queue(self, db: Reader | Store) -> QueuePlan:
        """The plan from one consistent snapshot, read without the write lock."""
        now = self.clock()
        running = await self._jobs_with_status(RUNNING, db=db)
        queued = await self._jobs_with_status(QUEUED, db=db)
        used = await scheduler.usage_by_owner(db, now, self.window_s)
        estimates = await scheduler.estimated_durations(db)
        return QueuePlan(scheduler.plan(running, queued, used, estimates, now, self.lanes), now)

    async def _entry(self, job_id: int) -> QueueEntry | None:
        return (await self.queue.plan()).entry_at(job_id, self.clock())

    async def position(self, job_id: int) -> int | None:
        """1-based place in the fair order; None unless queued."""
        entry = await self._entry(job_id)
        return None if entry is None else entry.position

    async def eta_s(self, job_id: int) -> float | None:
        """Seconds until the job should be finished; None once it is."""
        entry = await self._entry(job_id)
        return None if entry is None else entry.eta_s


async def cancel_job(db: Store, job_id: int, by_user_id: int, now: float) -> str:
    """The cancel transition (no permission check; run it inside `immediate()`). Also used by the admin, concept
    and member services."""
    if await db.execute("UPDATE jobs SET status = 'cancelled', cancelled_by = ?, finished_at = ?"
                        " WHERE id = ? AND status = 'queued'", (by_user_id, now, job_id)):
        return "cancelled"
    if await db.execute("UPDATE jobs SET cancel_requested = 1, cancelled_by = ?"
                        " WHERE id = ? AND status = 'running' AND cancel_requested = 0", (by_user_id, job_id)):
        return "requested"
    status = await db.fetchval("SELECT status FROM jobs WHERE id = ?", (job_id,))
    if status is None:
        raise NotFound(f"There is no job #{job_id}.")
    return "already requested" if status == RUNNING else "already finished"


async def touch_member(db: Store, guild_id: int, member_id: int, now: float) -> None:
    await db.execute(_TOUCH_MEMBER_SQL, (guild_id, member_id, now, now))
