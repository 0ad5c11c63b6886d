"""Delivery: each job's status message in its channel (queue place → live progress) and its final announcement.

Everything goes through the bot token to the channel, never through the interaction (its token dies after 15
minutes; a training takes longer). The notifier is what the dispatcher calls (bot/ Notifier protocol), and what
`Services.job_submitted` calls for each new job (`job_queued`). `ledger.mark_delivered` is taken before posting, so a
job is announced at most once even across a restart.
"""
from __future__ import annotations

import asyncio
import functools
import io
import logging
from pathlib import Path

import aiohttp
import discord

from bot.app import Services
from bot.client import BoothBot
from bot.jobs.kinds import JobKind
from cogs import _render
from cogs._base import BoothCog
from cogs._progress import EditThrottle
from cogs._views import result_view

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
MAX_FILES_PER_MESSAGE = 10
PREVIEW_NAME = "preview.webp"
READY_TIMEOUT_S = 120.0
GONE = -1  # message id of a status message someone deleted: leave it alone
REFRESH_FIRST_N = 10  # waiting jobs whose message shows a live place in the queue


def _read(path: str | Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


class DiscordNotifier:
    """Implements bot/'s Notifier for Discord (job_progress, job_finished) plus `job_queued` for new jobs."""

    def __init__(self, bot: BoothBot, services: Services, *, edit_interval: float = 2.0) -> None:
        self.bot = bot
        self.services = services
        self.throttle = EditThrottle(edit_interval)
        self._message_ids: dict[int, int] = {}       # job id -> status message id (also kept in the ledger)
        self._previews: dict[int, float] = {}        # job id -> mtime of the preview last uploaded
        self._locks: dict[int, asyncio.Lock] = {}

    # ----- helpers -----------------------------------------------------------------------------------------------
    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _channel(self, job) -> discord.PartialMessageable | None:
        if job.channel_id is None:
            return None
        return self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)

    def upload_limit(self, job) -> int:
        """Bytes per file: what the member's interaction said (/imagine keeps it), never above the server's."""
        limit = int((job.params or {}).get("upload_limit") or DEFAULT_UPLOAD_LIMIT)
        guild = self.bot.get_guild(job.guild_id)
        return min(limit, guild.filesize_limit) if guild is not None else limit

    def _message_id(self, job) -> int | None:
        known = self._message_ids.get(job.id) or job.message_id
        return None if known == GONE else known

    async def _status_embed(self, job) -> discord.Embed:
        ledger = self.services.ledger
        position, eta = await ledger.position(job.id), await ledger.eta_s(job.id)
        return _render.queued_embed(job, position, eta, paused=await self.services.admin.is_paused())

    # ----- Notifier ----------------------------------------------------------------------------------------------
    async def job_queued(self, job) -> None:
        """Post the job's status message (queue place and ETA) in its channel and remember where it is."""
        channel = self._channel(job)
        if channel is None:
            return
        async with self._lock(job.id):
            if self._message_id(job) is not None or self._message_ids.get(job.id) == GONE:
                return
            job = await self.services.ledger.get(job.id) or job
            if job.is_terminal:
                return  # finished before we got here; job_finished posts the outcome
            message = await channel.send(embed=await self._status_embed(job))
            self._message_ids[job.id] = message.id
            await self.services.ledger.set_message(job.id, job.channel_id, message.id)

    async def job_progress(self, job, event: dict) -> None:
        if event.get("event") not in (None, "progress", "paused") or job.channel_id is None:
            return
        await self.throttle.submit(job.id, lambda: self._edit_progress(job, event))

    async def _edit_progress(self, job, event: dict) -> None:
        try:
            async with self._lock(job.id):
                current = await self.services.ledger.get(job.id)
                if current is None or current.is_terminal or self._message_ids.get(job.id) == GONE:
                    return
                preview_name, files = self._preview(job.id, event.get("preview"))
                embed = _render.running_embed(current, event, preview_name=preview_name)
                message_id = self._message_id(current)
                channel = self._channel(current)
                if message_id is None:
                    message = await channel.send(embed=embed, files=files)
                    self._message_ids[job.id] = message.id
                    await self.services.ledger.set_message(job.id, current.channel_id, message.id)
                elif files:
                    await channel.get_partial_message(message_id).edit(embed=embed, attachments=files)
                else:
                    await channel.get_partial_message(message_id).edit(embed=embed)
        except discord.NotFound:
            log.info("job %s: its status message is gone (deleted in Discord?); no more progress edits", job.id)
            self._message_ids[job.id] = GONE
        except discord.HTTPException as e:
            log.warning("job %s: progress edit failed: %s", job.id, e)

    def _preview(self, job_id: int, path: str | None) -> tuple[str | None, list[discord.File]]:
        """The preview's attachment name (None: no preview yet) and the file to upload when it changed."""
        mtime = _mtime(path) if path else None
        if mtime is None:
            return None, []
        if self._previews.get(job_id) == mtime or (data := _read(path)) is None:
            return PREVIEW_NAME, []  # unchanged: the message keeps the one it has
        self._previews[job_id] = mtime
        return PREVIEW_NAME, [discord.File(io.BytesIO(data), PREVIEW_NAME)]

    async def refresh_queue(self) -> None:
        """The queue moved (a job ended): update the place and ETA shown on the first waiting jobs' messages."""
        try:
            entries = [e for e in await self.services.ledger.queue_view() if e.position is not None]
            paused = await self.services.admin.is_paused()
        except Exception:  # noqa: BLE001 - cosmetic; never let it stop a delivery
            log.exception("could not read the queue to refresh its messages")
            return
        for entry in entries[:REFRESH_FIRST_N]:
            if self._message_id(entry.job) is None or entry.job.channel_id is None:
                continue
            embed = _render.queued_embed(entry.job, entry.position, entry.eta_s, paused=paused)
            # Its own throttle key: the first progress edit (queued → running) is never held back by this one.
            await self.throttle.submit(("queued", entry.job.id),
                                       functools.partial(self._edit_queued, entry.job, embed))

    async def _edit_queued(self, job, embed: discord.Embed) -> None:
        async with self._lock(job.id):
            current = await self.services.ledger.get(job.id)
            if current is None or current.status != "queued" or (message_id := self._message_id(current)) is None:
                return
            await _quietly(self._channel(current).get_partial_message(message_id).edit(embed=embed))

    async def job_finished(self, job) -> None:
        """Announce a finished job once: mark it delivered, then post the outcome and retire the status message."""
        self.throttle.forget(job.id)
        self.throttle.forget(("queued", job.id))
        # Before marking it delivered: a bot that is not connected leaves the job for the next start's backlog.
        if not await self._connected():
            return
        async with self._lock(job.id):
            job = await self.services.ledger.get(job.id) or job
            if not job.is_terminal or not await self.services.ledger.mark_delivered(job.id):
                return
            try:
                await self._post_outcome(job)
            except Exception:  # noqa: BLE001 - nothing must take the dispatcher down; it is logged with the job id
                log.exception("job %s: could not deliver the outcome", job.id)
            finally:
                self._message_ids.pop(job.id, None)
                self._previews.pop(job.id, None)
        self._locks.pop(job.id, None)
        await self.refresh_queue()

    async def _connected(self, timeout: float = READY_TIMEOUT_S) -> bool:
        if self.bot.is_closed():
            return False
        try:
            await asyncio.wait_for(self.bot.wait_until_ready(), timeout)
        except asyncio.TimeoutError:
            log.warning("not connected to Discord; finished jobs are announced at the next start")
            return False
        return not self.bot.is_closed()

    # ----- outcome -----------------------------------------------------------------------------------------------
    async def _post_outcome(self, job) -> None:
        channel = self._channel(job)
        if channel is None:
            log.warning("job %s finished but has no channel to announce in", job.id)
            return
        status_id = self._message_id(job)
        if job.status == "succeeded":
            await self._result_poster(job)(channel, job)
        elif job.status == "cancelled" and status_id is not None:
            # No need to ping anyone: the member (or an admin) asked for it. The status message says so.
            await _quietly(channel.get_partial_message(status_id).edit(
                content=_render.failed_text(job), embed=None, attachments=[]))
            return
        else:
            await channel.send(_render.failed_text(job)[:2000], allowed_mentions=_only_owner(job))
        if status_id is not None:
            await _quietly(channel.get_partial_message(status_id).delete())

    def _result_poster(self, job):
        """How the kind's result is posted; a kind without its own is posted as images, as /imagine's are."""
        return {JobKind.TRAIN: self._post_train, JobKind.IMAGINE: self._post_imagine}.get(job.kind, self._post_imagine)

    async def _post_train(self, channel, job) -> None:
        result = job.result or {}
        files, notes = self._pick_files(job, result.get("samples") or [], {})
        text = _render.train_done_text(job, result)
        if notes:
            text += "\n" + "\n".join(notes)
        await self._send_in_batches(channel, job, text, files)

    async def _post_imagine(self, channel, job) -> None:
        result = job.result or {}
        images = result.get("images") or []
        files, notes = self._pick_files(job, images, result.get("small") or {})
        text = _render.imagine_done_text(job, result)
        if notes:
            text += "\n" + "\n".join(notes)
        await self._send_in_batches(channel, job, text, files,
                                    view=result_view(job.id, len(images)) if images else None)

    def _pick_files(self, job, paths: list[str], small: dict[str, str]) -> tuple[list[discord.File], list[str]]:
        """One file per image: the original when it fits the upload limit, else its smaller copy, else a note."""
        limit = self.upload_limit(job)
        files, notes = [], []
        for index, path in enumerate(paths):
            chosen = None
            for candidate in (path, small.get(path)):
                if candidate and (size := _size(candidate)) is not None and size <= limit:
                    chosen = candidate
                    break
            if chosen is None:
                notes.append(f"Image {index + 1} is too large to upload here; an admin can find it at `{path}`.")
                continue
            files.append(discord.File(chosen, filename=f"{job.kind}-{job.id}-{index + 1}{Path(chosen).suffix}"))
        return files, notes

    async def _send_in_batches(self, channel, job, text: str, files: list[discord.File], *, view=None) -> None:
        batches = list(_render.chunks(files, MAX_FILES_PER_MESSAGE)) or [[]]
        for number, batch in enumerate(batches):
            first, last = number == 0, number == len(batches) - 1
            kwargs = {"files": list(batch), "allowed_mentions": _only_owner(job)}
            if last and view is not None:
                kwargs["view"] = view
            await channel.send(text[:2000] if first else None, **kwargs)


def _only_owner(job) -> discord.AllowedMentions:
    """Ping the job's owner and nobody else (a prompt may contain other mentions)."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.owner_id)])


def _mtime(path: str) -> float | None:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


async def _quietly(coro) -> None:
    try:
        await coro
    except (discord.HTTPException, aiohttp.ClientError, OSError) as e:
        log.info("status message update skipped: %s", e)


class Delivery(BoothCog):
    """Owns the notifier and attaches it to the services, which then announce whatever waited for one."""

    def __init__(self, bot: BoothBot) -> None:
        super().__init__(bot)
        self.notifier = DiscordNotifier(bot, self.services)

    async def cog_load(self) -> None:
        self.services.set_notifier(self.notifier)

    async def cog_unload(self) -> None:
        # Also when the bot closes (discord.py unloads every extension then): without a Discord connection nothing
        # can be announced, so finished jobs wait, undelivered, for the next start.
        self.services.set_notifier(None)


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Delivery(bot))
