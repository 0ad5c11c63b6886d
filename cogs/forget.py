"""/forget: erase everything the member owns on this server, after a confirmation button."""
from __future__ import annotations

import discord
from discord import app_commands

from bot.client import BoothBot
from bot.services.members import forget_member
from cogs._base import BoothCog
from cogs._views import ask_to_confirm


def _summary(counts: dict) -> str:
    parts = [f"{counts.get('concepts', 0)} concept(s)", f"{counts.get('images', 0)} image(s)",
             f"{counts.get('jobs', 0)} job record(s)", f"{counts.get('files', 0)} file(s) and folder(s)"]
    text = "Done. Deleted " + ", ".join(parts) + "."
    if counts.get("still_running"):
        text += (f"\n{counts['still_running']} job(s) were running; they are stopping now. "
                 "Run /forget again in a minute to remove what they leave behind.")
    return text + ("\nImages already posted in channels are Discord messages: delete them there, "
                   "or ask a moderator.")


class Forget(BoothCog):
    @app_commands.command(name="forget", description="Delete everything the bot keeps about you on this server")
    @app_commands.guild_only()
    async def forget(self, interaction: discord.Interaction) -> None:
        confirmed = await ask_to_confirm(
            interaction,
            "This deletes your trained concepts, your photos, the images you made and your job history on this "
            "server. Waiting jobs are cancelled. It cannot be undone.",
            confirm_label="Delete everything", working="Deleting…")
        if confirmed is None:
            return
        services = self.services
        # The status messages of waiting jobs would go stale once their rows are gone; note them first.
        active = await services.ledger.list_jobs(guild_id=interaction.guild_id, owner_id=interaction.user.id,
                                                 statuses=("queued", "running"), limit=100)
        counts = await forget_member(services.store, services.settings.data_dir, interaction.guild_id,
                                     interaction.user.id)
        await confirmed.edit_original_response(content=_summary(counts))
        # Running jobs keep their rows until they stop; their cancellation is delivered like any outcome.
        gone = [job for job in active if await services.ledger.get(job.id) is None]
        await services.jobs_forgotten(gone)

async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Forget(bot))
