"""Admin services behind the admin commands. Every change writes an audit row (who, action, target, detail, when)
in the same transaction, so the log never misses an action nor records one that did not happen.

Deciding *who* is an admin is the cog's job (Discord permissions / the admin role). Pass the server the command
came from as `guild_id` to `cancel`/`bump`, so an admin of one server cannot touch another server's jobs.
Pause is bot-wide: one GPU serves every server.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from bot.jobs import scheduler
from bot.errors import NotFound, UserError
from bot.jobs.ledger import Job, Ledger, cancel_job
from bot.jobs.scheduler import LIMIT_NAMES, QueueEntry
from bot.settings import Settings
from bot.store.database import Store

MAX_LIMIT_VALUE = 1000


async def write_audit(db: Store, guild_id: int | None, by: int, action: str, target: str, detail: str,
                      at: float) -> None:
    """One audit row, written inside the caller's transaction (admin actions of other services use it too)."""
    await db.execute(
        "INSERT INTO audit_log (guild_id, actor_id, action, target, detail, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (guild_id, by, action, target, detail, at))


class AdminService:
    def __init__(self, store: Store, ledger: Ledger, settings: Settings, clock: Callable[[], float] = time.time):
        self.store = store
        self.ledger = ledger
        self.settings = settings
        self.clock = clock

    async def _audit(self, db: Store, guild_id: int | None, by: int, action: str, target: str = "",
                     detail: str = "") -> None:
        await write_audit(db, guild_id, by, action, target, detail, self.clock())

    async def audit(self, guild_id: int, limit: int = 20) -> list[dict]:
        """Newest first: this server's actions and bot-wide ones. Keys: id, guild_id, by, action, target, detail,
        created_at."""
        rows = await self.store.fetchall(
            "SELECT id, guild_id, actor_id AS by, action, target, detail, created_at FROM audit_log"
            " WHERE guild_id = ? OR guild_id IS NULL ORDER BY id DESC LIMIT ?", (guild_id, limit))
        return [dict(row) for row in rows]

    # --- queue ------------------------------------------------------------------------------------------------------

    async def queue(self, guild_id: int | None = None) -> list[QueueEntry]:
        return await self.ledger.queue_view(guild_id)

    async def pause(self, by: int, *, guild_id: int | None = None) -> bool:
        """Stop starting jobs (running ones finish). Returns False if it was already paused."""
        return await self._set_paused(by, True, guild_id)

    async def resume(self, by: int, *, guild_id: int | None = None) -> bool:
        return await self._set_paused(by, False, guild_id)

    async def _set_paused(self, by: int, paused: bool, guild_id: int | None) -> bool:
        async with self.store.immediate() as db:
            changed = await scheduler.set_paused(db, paused, self.clock())
            detail = [] if changed else ["no change"]
            if guild_id is not None:
                detail.append(f"from server {guild_id}")
            await self._audit(db, None, by, "pause" if paused else "resume", detail="; ".join(detail))
            return changed

    async def is_paused(self) -> bool:
        return await scheduler.is_paused(self.store)

    async def _job_in(self, job_id: int, guild_id: int | None) -> Job:
        job = await self.ledger.get(job_id)
        if job is None or (guild_id is not None and job.guild_id != guild_id):
            raise NotFound(f"There is no job #{job_id} on this server.")
        return job

    async def cancel(self, job_id: int, by: int, *, guild_id: int | None = None) -> str:
        """Cancel anyone's job; same answers as Ledger.cancel."""
        async with self.store.immediate() as db:
            job = await self._job_in(job_id, guild_id)
            outcome = await cancel_job(db, job_id, by, self.clock())
            await self._audit(db, job.guild_id, by, "cancel", f"job:{job_id}", outcome)
            return outcome

    async def bump(self, job_id: int, by: int, amount: int = 1, *, guild_id: int | None = None) -> Job:
        """Raise a queued job's priority (it breaks ties between members with equal recent GPU use, and orders
        one member's own jobs; it does not jump ahead of members who used the GPU less)."""
        async with self.store.immediate() as db:
            job = await self._job_in(job_id, guild_id)
            if not await db.execute("UPDATE jobs SET priority = priority + ? WHERE id = ? AND status = 'queued'",
                                    (amount, job_id)):
                raise UserError(f"Job #{job_id} is not waiting in the queue ({job.status}), so it cannot be bumped.")
            await self._audit(db, job.guild_id, by, "bump", f"job:{job_id}",
                              f"priority {job.priority} -> {job.priority + amount}")
            return await self.ledger.get(job_id)

    async def clear(self, by: int, guild_id: int, owner_id: int | None = None) -> int:
        """Cancel every queued job on this server (or one member's); running jobs are left to finish."""
        async with self.store.immediate() as db:
            sql, params = "SELECT id FROM jobs WHERE guild_id = ? AND status = 'queued'", [guild_id]
            if owner_id is not None:
                sql += " AND owner_id = ?"
                params.append(owner_id)
            ids = [row["id"] for row in await db.fetchall(sql, params)]
            now = self.clock()
            count = sum([await cancel_job(db, job_id, by, now) == "cancelled" for job_id in ids])
            await self._audit(db, guild_id, by, "clear", "all" if owner_id is None else f"member:{owner_id}",
                              f"{count} queued jobs cancelled")
            return count

    # --- limits -----------------------------------------------------------------------------------------------------

    async def set_limit(self, by: int, guild_id: int, name: str, value: int | None,
                        role_id: int | None = None) -> None:
        """Set a limit for the server (role_id None) or for members with a role; value None removes it."""
        if name not in LIMIT_NAMES:
            raise UserError(f"There is no limit called {name}; choose one of: {', '.join(LIMIT_NAMES)}.")
        if value is not None and not 0 <= value <= MAX_LIMIT_VALUE:
            raise UserError(f"A limit must be between 0 and {MAX_LIMIT_VALUE}; got {value}.")
        role = 0 if role_id is None else int(role_id)
        async with self.store.immediate() as db:
            if value is None:
                await db.execute("DELETE FROM limits WHERE guild_id = ? AND role_id = ? AND name = ?",
                                 (guild_id, role, name))
            else:
                await db.execute(
                    "INSERT INTO limits (guild_id, role_id, name, value, updated_by, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (guild_id, role_id, name)"
                    " DO UPDATE SET value = excluded.value, updated_by = excluded.updated_by,"
                    " updated_at = excluded.updated_at", (guild_id, role, name, value, by, self.clock()))
            await self._audit(db, guild_id, by, "set_limit", "server" if role == 0 else f"role:{role}",
                              f"{name}={'default' if value is None else value}")

    async def limits_for(self, guild_id: int, role_ids: Iterable[int] = ()) -> dict[str, int]:
        """The member's limits: the most generous of their roles that have one, else the server's, else Settings."""
        return await scheduler.limits_for(self.store, guild_id, role_ids, scheduler.default_limits(self.settings))

    async def limits(self, guild_id: int) -> list[dict]:
        """Every limit set on this server: keys role_id (None = server-wide), name, value."""
        rows = await self.store.fetchall(
            "SELECT role_id, name, value FROM limits WHERE guild_id = ? ORDER BY role_id, name", (guild_id,))
        return [{"role_id": row["role_id"] or None, "name": row["name"], "value": row["value"]} for row in rows]

    # --- the per-server safety filter -------------------------------------------------------------------------------

    async def safety_for(self, guild_id: int) -> bool:
        """Whether /imagine jobs of this server run with the safety filter: the admins' choice, else BOOTHBOT_SAFETY."""
        async with self.store.read() as db:
            chosen = await db.fetchval("SELECT safety FROM server_settings WHERE guild_id = ?", (guild_id,))
        return self.settings.safety if chosen is None else bool(chosen)

    async def set_safety(self, by: int, guild_id: int, on: bool | None) -> bool:
        """Turn the filter on or off for this server (None: back to the operator's default); returns the new state.
        Jobs already queued keep the choice they were submitted with."""
        async with self.store.immediate() as db:
            await db.execute(
                "INSERT INTO server_settings (guild_id, safety, updated_by, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (guild_id) DO UPDATE SET safety = excluded.safety, updated_by = excluded.updated_by,"
                " updated_at = excluded.updated_at", (guild_id, None if on is None else int(on), by, self.clock()))
            await self._audit(db, guild_id, by, "safety", "server", "default" if on is None else ("on" if on else "off"))
        return await self.safety_for(guild_id)

    # --- bans -------------------------------------------------------------------------------------------------------

    async def ban(self, by: int, guild_id: int, member_id: int, reason: str = "") -> None:
        """Block the member from submitting jobs on this server (queued jobs stay; use `clear` to drop them)."""
        async with self.store.immediate() as db:
            await db.execute(
                "INSERT INTO bans (guild_id, member_id, reason, banned_by, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (guild_id, member_id) DO UPDATE SET reason = excluded.reason,"
                " banned_by = excluded.banned_by, created_at = excluded.created_at",
                (guild_id, member_id, reason.strip(), by, self.clock()))
            await self._audit(db, guild_id, by, "ban", f"member:{member_id}", reason.strip())

    async def unban(self, by: int, guild_id: int, member_id: int) -> bool:
        """False if the member was not banned."""
        async with self.store.immediate() as db:
            removed = await db.execute("DELETE FROM bans WHERE guild_id = ? AND member_id = ?", (guild_id, member_id))
            await self._audit(db, guild_id, by, "unban", f"member:{member_id}", "" if removed else "was not banned")
            return removed == 1

    async def bans(self, guild_id: int) -> list[dict]:
        rows = await self.store.fetchall(
            "SELECT member_id, reason, banned_by AS by, created_at FROM bans WHERE guild_id = ? ORDER BY created_at",
            (guild_id,))
        return [dict(row) for row in rows]
