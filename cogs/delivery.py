"""Delivery: each job's status message in its channel (queue place → live progress) and its final announcement.

Everything goes through the bot token, never through the interaction (its token dies after 15 minutes; a training
takes longer). The notifier is what the dispatcher calls (bot/ Notifier protocol), what `Services.job_submitted`
calls for each new job (`job_queued`) and what /forget calls (`jobs_forgotten`): cogs make no channel calls of their
own.

A finished job's outcome goes through the delivery outbox (bot/dispatch/outbox.py) until it is out. Each message
of it (a "part": a result with more than 10 images takes several) is sent with a nonce Discord enforces,
`j<job id><route letter><part>`, and recorded in the ledger (`delivery_parts`) once Discord confirmed it; the job is
marked delivered only when every part was. Discord's 5xx and 429 answers, network errors and a lost connection
raise RetryLater: the outbox tries again after a pause, or at the next start, resuming at the first unconfirmed
part. When the channel refuses the outcome (403: a permission is missing; 404: the channel is gone; another 4xx),
the owner gets it by DM and the reason is kept on the job for admins (/queue admin list); if the DM is refused too
the job is marked delivered "nowhere" with both reasons.

The window left: a part whose post reached Discord but whose answer never came back (a kill -9 or a cut connection
at that moment) is posted again by the next attempt. Discord answers a repeated nonce with the existing message only
for a few minutes, so if the next attempt comes later than that (the bot stays down longer), that one part can
appear twice. Confirmed parts are never posted again.
"""
from __future__ import annotations

import asyncio
import functools
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import discord

from bot.app import Services
from bot.client import BoothBot
from bot.dispatch.outbox import RetryLater
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
ROUTE_LETTERS = {"channel": "c", "dm": "d"}
UNKNOWN_MESSAGE = 10008  # Discord's error code: the message (not the channel) is gone


def nonce(job_id: int, route: str, part: int) -> str:
    """The idempotency key of one message of a job's outcome (Discord allows 25 characters)."""
    return f"j{job_id}{ROUTE_LETTERS[route]}{part}"


def status_nonce(job_id: int) -> str:
    return f"j{job_id}s"


@dataclass
class Part:
    """One message of an outcome: sent, or (a cancellation) an edit of the job's status message."""
    content: str | None
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, file name)
    view: discord.ui.View | None = None
    edit_message_id: int | None = None

    def open_files(self) -> list[discord.File]:
        return [discord.File(path, filename=name) for path, name in self.files]


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
            try:
                message = await channel.send(embed=await self._status_embed(job), nonce=status_nonce(job.id))
            except (discord.HTTPException, aiohttp.ClientError, OSError) as e:
                # Only the status message is missing; the outcome is delivered (or sent to the owner) at the end.
                log.info("job %s: could not post its status message: %s", job.id, e)
                return
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
                    message = await channel.send(embed=embed, files=files, nonce=status_nonce(job.id))
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
        """Deliver a finished job's outcome and only then mark it delivered; RetryLater when a later try may work."""
        self.throttle.forget(job.id)
        self.throttle.forget(("queued", job.id))
        if not await self._connected():
            raise RetryLater("not connected to Discord")
        async with self._lock(job.id):
            job = await self.services.ledger.get(job.id) or job
            if not job.is_terminal or job.delivered_at is not None:
                return
            try:
                via, reason = await self._deliver(job)
            except Exception as e:
                if _may_pass(e):
                    raise RetryLater(_describe(e)) from e
                raise
            await self.services.ledger.mark_delivered(job.id, via, reason)
            if reason:
                log.warning("job %s: %s", job.id, reason)
            self._message_ids.pop(job.id, None)
            self._previews.pop(job.id, None)
        self._locks.pop(job.id, None)
        await self.refresh_queue()

    async def jobs_forgotten(self, jobs) -> None:
        """/forget deleted these waiting jobs: say so on their status messages (best effort: no record is left)."""
        for job in jobs:
            self.throttle.forget(job.id)
            self.throttle.forget(("queued", job.id))
            async with self._lock(job.id):
                message_id, channel = self._message_id(job), self._channel(job)
                if message_id is not None and channel is not None:
                    await _quietly(channel.get_partial_message(message_id).edit(
                        content=f"Job {job.id} was cancelled: its owner used /forget.", embed=None, attachments=[]))
                self._message_ids.pop(job.id, None)
                self._previews.pop(job.id, None)
            self._locks.pop(job.id, None)

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
    async def _deliver(self, job) -> tuple[str, str | None]:
        """Post the outcome in the job's channel, else to its owner by DM. Returns (delivered_via, why not the
        channel). Errors that may pass propagate (the outbox retries)."""
        refused = "the job has no channel"
        channel = self._channel(job)
        if channel is not None:
            try:
                await self._post(job, "channel", channel)
            except discord.HTTPException as e:
                if _may_pass(e):
                    raise
                refused = f"its channel refused the outcome ({_describe(e)})"
            else:
                await self._retire_status_message(job, channel)
                return "channel", None
        try:
            dm = await self.bot.create_dm(discord.Object(job.owner_id))
            await self._post(job, "dm", dm)
        except discord.HTTPException as e:
            if _may_pass(e):
                raise
            return "nowhere", f"{refused}; the owner's DMs refused it too ({_describe(e)})"
        return "dm", f"{refused}; sent to the owner by DM"

    async def _post(self, job, route: str, target) -> None:
        """Send the parts Discord has not confirmed yet, each with its nonce, recording each confirmation."""
        ledger = self.services.ledger
        confirmed = await ledger.confirmed_parts(job.id, route)
        for number, part in enumerate(self._parts(job, route)):
            if number in confirmed:
                continue
            message = None
            if part.edit_message_id is not None:
                try:
                    message = await target.get_partial_message(part.edit_message_id).edit(
                        content=part.content, embed=None, attachments=[])
                except discord.NotFound as e:
                    if e.code != UNKNOWN_MESSAGE:
                        raise  # the channel is gone, not just the status message
            if message is None:
                message = await target.send(part.content, files=part.open_files(), view=part.view,
                                            allowed_mentions=_only_owner(job), nonce=nonce(job.id, route, number))
            await ledger.confirm_part(job.id, route, number, message.id)

    def _parts(self, job, route: str) -> list[Part]:
        """The outcome's messages, the same on every attempt (so a part keeps its nonce)."""
        status_id = self._message_id(job)
        if job.status == "succeeded":
            parts = self._result_parts(job, with_buttons=route == "channel")
        elif job.status == "cancelled" and status_id is not None and route == "channel":
            # No need to ping anyone: the member (or an admin) asked for it. The status message says so.
            return [Part(_render.failed_text(job)[:2000], edit_message_id=status_id)]
        else:
            parts = [Part(_render.failed_text(job))]
        if route == "dm":
            parts[0].content = (f"I could not post this in <#{job.channel_id}>, so here it is.\n"
                                if job.channel_id else "") + (parts[0].content or "")
        parts[0].content = (parts[0].content or "")[:2000]
        return parts

    def _result_parts(self, job, *, with_buttons: bool) -> list[Part]:
        """A kind without its own result text is posted as images, as /imagine's are."""
        result = job.result or {}
        if job.kind == JobKind.TRAIN:
            paths, small, text = result.get("samples") or [], {}, _render.train_done_text(job, result)
        else:
            paths, small, text = result.get("images") or [], result.get("small") or {}, _render.imagine_done_text(
                job, result)
        files, notes = self._pick_files(job, paths, small)
        if notes:
            text += "\n" + "\n".join(notes)
        parts = [Part(text if number == 0 else None, list(batch))
                 for number, batch in enumerate(_render.chunks(files, MAX_FILES_PER_MESSAGE))] or [Part(text)]
        if with_buttons and job.kind != JobKind.TRAIN and paths:
            parts[-1].view = result_view(job.id, len(paths))
        return parts

    async def _retire_status_message(self, job, channel) -> None:
        """The outcome is out: the status message goes (cosmetic, so failures are only logged)."""
        status_id = self._message_id(job)
        if status_id is None or job.status == "cancelled":
            return  # a cancellation was written onto the status message itself
        try:
            await channel.get_partial_message(status_id).delete()
        except discord.NotFound:
            pass  # deleted already (an earlier attempt, or someone in Discord)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as e:
            log.info("job %s: its status message stays (%s)", job.id, e)

    def _pick_files(self, job, paths: list[str], small: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
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
            files.append((chosen, f"{job.kind}-{job.id}-{index + 1}{Path(chosen).suffix}"))
        return files, notes


def _may_pass(error: BaseException) -> bool:
    """Discord's server errors, rate limits, network trouble: a later attempt may work."""
    if isinstance(error, discord.RateLimited):
        return True
    if isinstance(error, discord.HTTPException):
        return error.status >= 500 or error.status == 429
    return isinstance(error, (aiohttp.ClientError, OSError, asyncio.TimeoutError))


def _describe(error: BaseException) -> str:
    if isinstance(error, discord.HTTPException):
        return f"{error.status} {error.text or error.response.reason}".strip()
    return f"{type(error).__name__}: {error}".rstrip(": ")


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
