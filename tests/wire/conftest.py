"""Wire tier: the real bot (client, cogs, services, GPU worker on the tiny model) against a fake Discord on 127.0.0.1.

One bot + services + worker for the whole wire tier (session-scoped event loop and fixtures): the worker loads torch
once. Tests share the database, so each uses its own members and none relies on another having run; the restart
test stops and starts the shared bot and leaves it running.
"""
from __future__ import annotations

import discord
import pytest
import pytest_asyncio
import yarl

from bench.wire.fake_discord import FakeDiscord
from wire_support import Booth, booth_settings


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def fake():
    fake = FakeDiscord()
    await fake.start()
    patch = pytest.MonkeyPatch()
    patch.setattr(discord.http.Route, "BASE", fake.api_base)
    patch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    try:
        yield fake
    finally:
        patch.undo()
        await fake.close()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def booth(fake, tiny_model_dir, tmp_path_factory):
    """A running bot + services + worker against the fake Discord, shared by every wire test."""
    booth = Booth(fake, booth_settings(fake, tmp_path_factory.mktemp("data"), tiny_model_dir))
    await booth.start()
    try:
        yield booth
    finally:
        await booth.stop()
