"""What every cog shares: the bot's Services, typed, reached one way.

A cog subclasses BoothCog and uses `self.services`; code that has only an interaction (buttons, autocomplete)
calls `services_of(interaction)`. Both return the bot/app.py Services the client was started with.
"""
from __future__ import annotations

from typing import cast

import discord
from discord.ext import commands

from bot.app import Services
from bot.client import BoothBot


class BoothCog(commands.Cog):
    def __init__(self, bot: BoothBot) -> None:
        self.bot = bot
        super().__init__()

    @property
    def services(self) -> Services:
        return self.bot.services


def services_of(interaction: discord.Interaction) -> Services:
    # discord.py types interaction.client as a plain Client; in this bot it is always a BoothBot.
    return cast(BoothBot, interaction.client).services
