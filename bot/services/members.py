"""Member erasure (/forget): a member's concepts, images, jobs and files on one server, gone.

Kept on purpose: bans (a ban must not be escapable by /forget) and the admin audit log. A job that is running
cannot be deleted under the worker; it is asked to stop and counted in `still_running`, so the member can be told
to run /forget again once it has ended.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bot.services.concepts import concept_dir, remove_tree
from bot.jobs.ledger import cancel_job
from bot.store.database import Store


async def forget_member(store: Store, data_dir: Path, guild_id: int, member_id: int, *,
                        clock=time.time) -> dict:
    """Delete the member's rows and files on this server. Returns counts:
    {"concepts", "images", "jobs", "files", "still_running"} (files: directories and files removed)."""
    data_dir = Path(data_dir)
    async with store.immediate() as db:
        now = clock()
        jobs = await db.fetchall("SELECT id, status FROM jobs WHERE guild_id = ? AND owner_id = ?",
                                 (guild_id, member_id))
        for job in jobs:
            if job["status"] in ("queued", "running"):
                await cancel_job(db, job["id"], member_id, now)
        running = {row["id"] for row in await db.fetchall(
            "SELECT id FROM jobs WHERE guild_id = ? AND owner_id = ? AND status = 'running'", (guild_id, member_id))}
        deleted_jobs = [job["id"] for job in jobs if job["id"] not in running]
        concept_ids = [row["id"] for row in await db.fetchall(
            "SELECT id FROM concepts WHERE guild_id = ? AND owner_id = ?", (guild_id, member_id))]
        live_concepts = await db.fetchval(
            "SELECT COUNT(*) FROM concepts WHERE guild_id = ? AND owner_id = ? AND status != 'deleted'",
            (guild_id, member_id))
        images = await db.execute("DELETE FROM images WHERE guild_id = ? AND owner_id = ?", (guild_id, member_id))
        await db.execute("DELETE FROM concepts WHERE guild_id = ? AND owner_id = ?", (guild_id, member_id))
        await db.execute("DELETE FROM jobs WHERE guild_id = ? AND owner_id = ? AND status != 'running'",
                         (guild_id, member_id))
        await db.execute("DELETE FROM members WHERE guild_id = ? AND member_id = ?", (guild_id, member_id))

    paths = [concept_dir(data_dir, cid) for cid in concept_ids]
    for job_id in deleted_jobs:
        paths += [data_dir / "images" / str(int(job_id)), data_dir / "previews" / f"{int(job_id)}.webp"]
    files = 0
    for path in paths:
        if path.is_dir():
            files += await remove_tree(path)
        elif path.exists():
            await asyncio.to_thread(path.unlink, missing_ok=True)
            files += 1
    return {"concepts": live_concepts, "images": images, "jobs": len(deleted_jobs), "files": files,
            "still_running": len(running)}
