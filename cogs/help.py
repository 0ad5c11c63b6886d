"""/help: the whole flow on one page, with examples."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs import _render


def help_embed(settings) -> discord.Embed:
    embed = discord.Embed(title="boothbot: teach the image model your face, pet or style", colour=_render.COLOR_INFO)
    embed.description = (
        "Everyone here shares one GPU, so jobs wait their turn in a fair queue "
        "(whoever used the GPU least lately goes first)."
    )
    embed.add_field(name="1. Train a concept", inline=False, value=(
        f"`/train token:squidarth class:man` and attach {settings.min_photos}–{settings.max_photos} photos "
        "(photo1…photo10, or a .zip for more). Pick a made-up word for the token. Use clear, varied photos of "
        "just your subject: different days, angles and backgrounds; no sunglasses, no group shots. "
        "You'll see which photos were kept, then live progress in the channel."))
    embed.add_field(name="2. Use it", inline=False, value=(
        "`/imagine prompt: a photo of squidarth man as an astronaut`\n"
        "Options: `negative` (what to avoid), `seed` (repeat a result), `steps`, `cfg`, `size`, `count`. "
        "Under each result: 🎲 re-roll, V1–V4 variations of one image, ℹ️ the exact parameters."))
    embed.add_field(name="3. Manage", inline=False, value=(
        "`/concepts list | info | share | unshare | delete | export` — your concepts are private until you share "
        "them; export sends you the LoRA file for A1111/ComfyUI.\n"
        "`/queue show` your jobs, place and ETA · `/queue cancel job:<n>`\n"
        "`/forget` deletes everything the bot keeps about you on this server."))
    admin = f"Manage Server{f' or the {settings.admin_role} role' if settings.admin_role else ''}"
    embed.add_field(name="Admins", inline=False, value=(
        f"`/queue admin list | pause | resume | cancel | bump | clear | limits | ban | unban | audit` ({admin})."))
    return embed


class Help(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot

    @app_commands.command(name="help", description="How to train a concept and make images with it")
    @app_commands.guild_only()
    async def help(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=help_embed(self.bot.settings), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Help(bot))
