"""The discord.py client: loads every cog module as an extension, syncs the slash commands, answers errors.

bot/ never imports cogs/: the cog modules are found by name (`cog_extensions`) and find the services on the client
(`BoothBot.services`).
"""
from __future__ import annotations

import importlib.util
import logging
import pkgutil

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.admin_roles import AdminRoles
from bot.app import Services
from bot.settings import Settings
from trainer.contract.errors import UserError

log = logging.getLogger(__name__)

COGS_PACKAGE = "cogs"
DM_REFUSAL = "boothbot works inside a server, not in direct messages. Please use the commands in a server channel."


def error_reference(interaction: discord.Interaction) -> str:
    """What the apology names so an admin can find the log line: the job id when the cog knew one."""
    job_id = interaction.extras.get("job_id")
    return f"job {job_id}" if job_id is not None else f"ref {interaction.id}"


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer only the member, whether or not the interaction was already acknowledged."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as e:  # the token may have expired; there is no one left to tell
        log.warning("could not answer interaction %s: %s", interaction.id, e)


def member_message(error: Exception) -> str | None:
    """The text for a mistake the member can fix, or None for a bug."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, app_commands.NoPrivateMessage):
        return DM_REFUSAL
    if isinstance(error, app_commands.MissingPermissions):
        return "Only server admins (Manage Server) can do that."
    if isinstance(error, app_commands.TransformerError):
        return f"`{error.value}` is not a valid value there. Please pick one of the offered choices."
    if isinstance(error, (app_commands.CommandNotFound, app_commands.CommandSignatureMismatch)):
        return ("That command changed since your Discord app loaded it. Reload Discord (Ctrl+R, or restart the app) "
                "and try again.")
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down a little: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.CheckFailure) and str(error):
        return str(error)
    return None


async def answer_error(interaction: discord.Interaction, error: Exception) -> None:
    """Member mistakes get what to do next; anything else is logged and gets a short apology with a reference."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    text = member_message(error)
    if text is None:
        reference = error_reference(interaction)
        command = interaction.command.qualified_name if interaction.command else interaction.data.get("custom_id", "?")
        log.error("unexpected error in %s (%s, member %s)", command, reference, interaction.user.id, exc_info=error)
        text = f"Sorry, something went wrong on our side ({reference}). An admin can look it up in the bot's log."
    await send_ephemeral(interaction, text)


class BoothTree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None and interaction.type is not discord.InteractionType.autocomplete:
            raise app_commands.NoPrivateMessage(DM_REFUSAL)
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await answer_error(interaction, error)


def cog_extensions(package: str = COGS_PACKAGE) -> tuple[str, ...]:
    """Every module of the cogs package, by name, except private helpers (`_views`, `_render`, …)."""
    # find_spec locates the package without importing it, so bot/ still imports nothing from cogs/.
    locations = importlib.util.find_spec(package).submodule_search_locations
    return tuple(sorted(f"{package}.{module.name}" for module in pkgutil.iter_modules(locations)
                        if not module.name.startswith("_")))


class BoothBot(commands.Bot):
    """The bot: `services` is the bot/app.py Services container the cogs use (cogs/_base.py reaches it)."""

    settings: Settings
    services: Services

    def __init__(self, settings: Settings, services: Services, **options) -> None:
        intents = discord.Intents.default()
        intents.message_content = False
        intents.presences = False
        intents.members = False
        options.setdefault("allowed_mentions", discord.AllowedMentions(everyone=False, roles=False, users=True))
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, tree_cls=BoothTree,
                         help_command=None, **options)
        self.settings = settings
        self.services = services
        self.admin_roles = AdminRoles(settings.admin_role)

    async def setup_hook(self) -> None:
        for name in cog_extensions():
            await self.load_extension(name)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Sync to the configured servers (instant), or globally (Discord may take up to an hour) when none."""
        if self.settings.guild_ids:
            for guild_id in self.settings.guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to server %s", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d commands globally (can take up to an hour to show everywhere)", len(synced))

    async def on_guild_available(self, guild: discord.Guild) -> None:
        self.admin_roles.role_id(guild)  # resolve BOOTHBOT_ADMIN_ROLE in this server now, and log what it is

    async def on_guild_join(self, guild: discord.Guild) -> None:
        self.admin_roles.role_id(guild)

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (%s) in %d server(s)", self.user, self.user.id if self.user else "?",
                 len(self.guilds))


def is_admin(interaction: discord.Interaction) -> bool:
    """Manage Server, or the configured admin role, matched by its id (bot/admin_roles.py)."""
    if interaction.permissions.manage_guild:
        return True
    admin_roles = getattr(interaction.client, "admin_roles", None)
    return admin_roles is not None and admin_roles.has_role(interaction.guild, interaction.user)


# discord.py's own connector has no limit, so a burst of commands opened one new connection per request (each
# deferral and follow-up): hundreds of TCP (and TLS, against Discord) handshakes started in one turn of the event
# loop stalled it for a quarter of a second (docs/BENCHMARKS.md, Burst). With a limit, requests beyond it wait for
# a kept-alive connection; this many is plenty for Discord's rate limits (50 requests/s per bot).
DISCORD_HTTP_CONNECTIONS = 32


async def run_discord(settings: Settings, services: Services) -> None:
    """Connect to Discord and serve until the process is stopped (what `python -m bot` runs)."""
    connector = aiohttp.TCPConnector(limit=DISCORD_HTTP_CONNECTIONS)  # needs the running loop: made here
    async with BoothBot(settings, services, connector=connector) as bot:
        await bot.start(settings.require_token())
