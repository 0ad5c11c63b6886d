"""/train: teach the model a member's subject from their photos (attachments or one .zip)."""
from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import aiohttp
import discord
from discord import app_commands

from bot.client import BoothBot
from bot.errors import UserError
from bot.services.photo_intake import intake_workspace
from bot.services.submissions import MAX_ZIP_MB, check_training, submit_training
from cogs import _render
from cogs._base import BoothCog
from trainer.contract.naming import CLASS_MAX_LENGTH, TOKEN_LENGTH
from trainer.contract.train_spec import MEMBER_OPTIONS

log = logging.getLogger(__name__)

PHOTO_OPTIONS = 10
STEPS = MEMBER_OPTIONS["steps"].for_members
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_read=60)


async def download(attachments: list[discord.Attachment], into: Path, *, max_photo_mb: int,
                   http: discord.http.HTTPClient | None = None) -> list[tuple[str, Path]]:
    """Save the attachments in `into` now (Discord's CDN links expire), a chunk at a time, refusing oversized ones
    before reading them. Returns (file name, saved path); the path is ours (attachment-NN), never the member's name."""
    files = []
    async with aiohttp.ClientSession(timeout=DOWNLOAD_TIMEOUT) as session:
        for number, attachment in enumerate(attachments):
            is_zip = attachment.filename.lower().endswith(".zip")
            limit_mb = MAX_ZIP_MB if is_zip else max_photo_mb
            most = f"the most allowed is {limit_mb} MB {'for a .zip' if is_zip else 'per photo'}"
            if attachment.size > limit_mb * 1024 * 1024:
                raise UserError(f"{attachment.filename} is {attachment.size / 1024 / 1024:.1f} MB; {most}. Please "
                                "send a smaller file.")
            path = into / f"attachment-{number:02d}"
            try:
                await _save(session, attachment.url, path, limit_mb * 1024 * 1024, http)
            except _TooBig:
                raise UserError(f"{attachment.filename} is larger than {limit_mb} MB; {most}. Please send a smaller "
                                "file.") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                log.warning("could not download %s", attachment.url, exc_info=True)
                raise UserError(f"Discord would not give me {attachment.filename} (the link may have expired). "
                                "Please run /train again with the photos attached.") from None
            files.append((attachment.filename, path))
    return files


class _TooBig(Exception):
    pass


async def _save(session: aiohttp.ClientSession, url: str, path: Path, limit: int,
                http: discord.http.HTTPClient | None) -> None:
    proxy = dict(proxy=http.proxy, proxy_auth=http.proxy_auth) if http is not None else {}
    async with session.get(url, **proxy) as response:
        response.raise_for_status()
        with path.open("wb") as out:
            async for chunk in response.content.iter_chunked(1 << 16):
                if out.tell() + len(chunk) > limit:  # the size Discord announced may be wrong
                    raise _TooBig
                out.write(chunk)


class Train(BoothCog):
    @app_commands.command(name="train", description="Teach the bot your subject from 3–30 photos (or one .zip).")
    @app_commands.guild_only()
    @app_commands.rename(class_name="class")
    @app_commands.describe(
        token="A made-up word that will stand for your subject in prompts, e.g. squidarth",
        class_name="What the subject is, in a word or two: man, woman, dog, cat, style…",
        zip="A .zip with up to 30 photos (instead of, or as well as, photo1…photo10)",
        steps="Training steps (more = closer likeness but slower; default is usually right)",
        style="Train an art style instead of a subject",
        **{f"photo{i}": f"Photo {i} of your subject" for i in range(1, PHOTO_OPTIONS + 1)},
    )
    async def train(self, interaction: discord.Interaction, token: app_commands.Range[str, *TOKEN_LENGTH],
                    class_name: app_commands.Range[str, 1, CLASS_MAX_LENGTH],
                    photo1: discord.Attachment | None = None, photo2: discord.Attachment | None = None,
                    photo3: discord.Attachment | None = None, photo4: discord.Attachment | None = None,
                    photo5: discord.Attachment | None = None, photo6: discord.Attachment | None = None,
                    photo7: discord.Attachment | None = None, photo8: discord.Attachment | None = None,
                    photo9: discord.Attachment | None = None, photo10: discord.Attachment | None = None,
                    zip: discord.Attachment | None = None,
                    steps: app_commands.Range[int, STEPS.low, STEPS.high] | None = None,
                    style: bool = False) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = self.services
        attachments = [a for a in (photo1, photo2, photo3, photo4, photo5, photo6, photo7, photo8, photo9, photo10,
                                   zip) if a is not None]
        if not attachments:
            raise UserError("Attach your photos: use the photo1…photo10 options, or one .zip with up to "
                            f"{services.settings.max_photos} photos in the zip option.")
        if any(a.filename.lower().endswith(".zip") for a in attachments if a is not zip):
            raise UserError("Put a .zip in the `zip` option; photo1…photo10 take single photos.")
        role_ids = [r.id for r in getattr(interaction.user, "roles", ())]
        # Bans, limits, token and class first, so a request that cannot be queued costs no downloads or unpacking.
        await check_training(services, guild_id=interaction.guild_id, member_id=interaction.user.id, role_ids=role_ids,
                             token=token, class_name=class_name, style=style, options={"steps": steps})
        async with intake_workspace(services.settings.data_dir) as uploads:
            files = await download(attachments, uploads, max_photo_mb=services.settings.max_photo_mb,
                                   http=getattr(interaction.client, "http", None))
            job, report = await submit_training(
                services, guild_id=interaction.guild_id, member_id=interaction.user.id,
                channel_id=interaction.channel_id, role_ids=role_ids,
                token=token, class_name=class_name, style=style, files=files, options={"steps": steps})
        interaction.extras["job_id"] = job.id
        embed = _render.intake_embed(report.summary(), token=job.params.get("token", token),
                                     accepted=len(report.accepted), ok=True)
        embed.description = (embed.description or "") + (
            "\n\nYour training is queued; its progress shows in this channel.")
        files_out = []
        if report.contact_sheet is not None:  # thumbnails made by the intake process
            embed.set_image(url="attachment://accepted.jpg")
            files_out.append(discord.File(io.BytesIO(report.contact_sheet), "accepted.jpg"))
        await interaction.followup.send(embed=embed, files=files_out, ephemeral=True)


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Train(bot))
