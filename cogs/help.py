"""/help: the flow in three steps, then every command with its options, read from the command tree (so a new command
shows up here without an edit)."""
from __future__ import annotations

import discord
from discord import app_commands

from bot.client import BoothBot
from bot.settings import Settings
from cogs import _render
from cogs._base import BoothCog

FIELD_LIMIT = 1024  # characters in one embed field's value (Discord)


def command_line(command: app_commands.Command) -> str:
    """`/queue cancel job` — Cancel one of your jobs   (optional options in brackets)"""
    options = [param.display_name if param.required else f"[{param.display_name}]" for param in command.parameters]
    return f"`/{' '.join([command.qualified_name, *options])}` — {command.description}"


def command_sections(commands: list[app_commands.Command | app_commands.Group]) -> list[tuple[str, list[str]]]:
    """(title, lines) per top-level command and per group of subcommands, in the tree's order."""
    sections: list[tuple[str, list[str]]] = []
    for command in commands:
        if isinstance(command, app_commands.Group):
            lines = [command_line(c) for c in command.commands if isinstance(c, app_commands.Command)]
            sections.append((f"/{command.qualified_name} — {command.description}", lines))
            sections.extend(command_sections([c for c in command.commands if isinstance(c, app_commands.Group)]))
        else:
            sections.append((f"/{command.qualified_name}", [command_line(command)]))
    return sections


def _fields(title: str, lines: list[str]) -> list[tuple[str, str]]:
    """One embed field per FIELD_LIMIT characters of lines; the continuations keep the title."""
    fields, value = [], ""
    for line in lines:
        if value and len(value) + 1 + len(line) > FIELD_LIMIT:
            fields.append(value)
            value = ""
        value = f"{value}\n{line}" if value else line[:FIELD_LIMIT]
    fields.append(value)
    return [(title if i == 0 else f"{title} (more)", text) for i, text in enumerate(fields)]


def _retention(settings: Settings) -> str:
    days = settings.photo_retention_days
    return "right" if days == 0 else f"{days} day{'s' if days != 1 else ''}"


def help_embed(settings: Settings, commands: list[app_commands.Command | app_commands.Group]) -> discord.Embed:
    embed = discord.Embed(title="boothbot: teach the image model your face, pet or style", colour=_render.COLOR_INFO)
    admin = f"Manage Server{f' or the {settings.admin_role} role' if settings.admin_role else ''}"
    embed.description = (
        "Everyone here shares one GPU, so jobs wait their turn in a fair queue "
        "(whoever used the GPU least lately goes first).\n\n"
        f"**1. Train a concept:** `/train token:squidarth class:man` and attach {settings.min_photos}–"
        f"{settings.max_photos} photos (photo1…photo10, or a .zip for more). The token is the name you'll type to "
        "call up your subject: a made-up word such as squidarth or sks, not an everyday word (photo, the) or a class "
        "word (man, dog). Use clear, varied photos of just your subject: different days, angles and backgrounds; "
        "no sunglasses, no group shots. You'll see which photos were kept, then live progress in the channel.\n"
        "**2. Use it:** `/imagine prompt: a photo of squidarth man as an astronaut`. Under each result: 🎲 re-roll, "
        "V1–V4 variations of one image, ℹ️ the exact parameters.\n"
        "**3. Manage:** your concepts are private until you share them; export sends you the LoRA file for "
        "A1111/ComfyUI. `/forget` deletes everything the bot keeps about you on this server. The photos you upload "
        f"are deleted {_retention(settings)} after the training ends; the concept stays.\n\n"
        f"Options in [brackets] are optional. Admin commands need {admin}.")
    for title, lines in command_sections(commands):
        for name, value in _fields(title, lines):
            embed.add_field(name=name[:256], value=value, inline=False)
    return embed


class Help(BoothCog):
    @app_commands.command(name="help", description="How to train a concept and make images with it")
    @app_commands.guild_only()
    async def help(self, interaction: discord.Interaction) -> None:
        embed = help_embed(self.services.settings, self.bot.tree.get_commands())
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: BoothBot) -> None:
    await bot.add_cog(Help(bot))
