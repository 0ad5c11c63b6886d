"""Queueing /imagine jobs for the member of an interaction: from the command, and from the result buttons (re-roll,
variations of one image). Both the imagine cog and the buttons (cogs/_views.py) use it."""
from __future__ import annotations

import discord

from bot.errors import NotFound
from bot.jobs.ledger import Job
from bot.services.submissions import VARIATION_STRENGTH, submit_imagine
from cogs import _render
from cogs._base import services_of


def member_role_ids(interaction: discord.Interaction) -> list[int]:
    return [role.id for role in getattr(interaction.user, "roles", ())]


async def queue_imagine(interaction: discord.Interaction, **options) -> Job:
    """Queue an /imagine job for this member (its status message follows in the channel)."""
    job = await submit_imagine(
        services_of(interaction), guild_id=interaction.guild_id, member_id=interaction.user.id,
        channel_id=interaction.channel_id, role_ids=member_role_ids(interaction),
        upload_limit=interaction.filesize_limit, **options)
    interaction.extras["job_id"] = job.id
    return job


async def queue_again(interaction: discord.Interaction, job: Job, *, variation_of: int | None) -> None:
    """Re-roll (same prompt, new seed) or make variations of one image of a finished job, for whoever clicked."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    params = job.params
    options = dict(prompt=params["prompt"], negative=params.get("negative") or "", steps=params.get("steps"),
                   cfg=params.get("cfg"), width=params.get("width"), height=params.get("height"),
                   count=params.get("count") or 1, seed=None, size=params.get("size"))
    if variation_of is not None:
        images = (job.result or {}).get("images") or []
        if not 0 <= variation_of < len(images):
            raise NotFound("That image no longer exists. Use /imagine to make new ones.")
        options.update(init_image=images[variation_of], strength=VARIATION_STRENGTH)
    new_job = await queue_imagine(interaction, **options)
    what = f"Variations of image {variation_of + 1}" if variation_of is not None else "A re-roll"
    using = _render.using_model_line(new_job.params)
    await interaction.followup.send(f"{what} of job {job.id} is queued as job {new_job.id}; "
                                    "it will show up in this channel." + (f"\n{using}" if using else ""),
                                    ephemeral=True)
