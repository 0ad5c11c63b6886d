"""`python -m bot run` when Discord cannot be reached or refuses the token: plain lines, never a traceback.

The bot runs as a real process; a small wrapper points discord.py's REST base and gateway at a fake Discord (or at a
port that refuses connections) and then calls the same main() as `python -m bot`.
"""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from bench.wire import live_bot
from bench.wire.fake_discord import FakeDiscord, json_response

pytestmark = pytest.mark.asyncio(loop_scope="module")


class TokenRejectingDiscord(FakeDiscord):
    async def _route(self, method, path, body, files, request):
        if path == "/users/@me":
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        return await super()._route(method, path, body, files, request)


async def start_bot(tmp_path: Path, model: Path, api: str, gateway: str) -> asyncio.subprocess.Process:
    return await live_bot.start_bot(api, gateway, live_bot.bot_environment(tmp_path / "data", model, home=tmp_path),
                                    env_file=tmp_path / "no.env")


async def finish(bot: asyncio.subprocess.Process, timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = await asyncio.wait_for(bot.communicate(), timeout)
    finally:
        if bot.returncode is None:
            bot.kill()
    return bot.returncode, output.decode(errors="replace")


def last_line(output: str) -> str:
    return output.rstrip().splitlines()[-1]


async def test_discord_refusing_the_connection_stops_the_start_with_one_plain_line(tmp_path, tiny_model_dir,
                                                                                   closed_port):
    down = f"127.0.0.1:{closed_port}"
    code, output = await finish(await start_bot(tmp_path, tiny_model_dir, f"http://{down}/api/v10", f"ws://{down}/"))
    assert "Traceback" not in output, output
    assert code == 2, output
    assert last_line(output) == (
        f"boothbot cannot start: cannot reach Discord at {down} (connection refused): check this machine's "
        "internet connection, firewall or proxy, then start the bot again")


async def test_rejected_token_stops_the_start_with_how_to_get_a_new_one(tmp_path, tiny_model_dir, closed_port):
    fake = TokenRejectingDiscord()
    await fake.start()
    try:
        code, output = await finish(await start_bot(tmp_path, tiny_model_dir, fake.api_base, fake.gateway_url))
    finally:
        await fake.close()
    assert "Traceback" not in output, output
    assert code == 2, output
    assert last_line(output).startswith(
        "boothbot cannot start: Discord refused DISCORD_TOKEN (401 Unauthorized): reset the token in the developer "
        "portal (https://discord.com/developers/applications -> your app -> Bot -> Reset Token)")
    assert live_bot.TOKEN not in output


async def test_gateway_refusing_the_connection_is_retried_with_one_plain_line_each_time(tmp_path, tiny_model_dir,
                                                                                        closed_port):
    # Login works (REST) but the gateway is down: discord.py keeps retrying, as it should for an outage; each
    # attempt is one warning line instead of a traceback.
    fake = FakeDiscord()
    await fake.start()
    bot = await start_bot(tmp_path, tiny_model_dir, fake.api_base, f"ws://127.0.0.1:{closed_port}/")
    seen = []
    try:
        async def retry_line():
            while line := (await bot.stdout.readline()).decode(errors="replace"):
                seen.append(line)
                if "no connection to Discord (" in line:
                    return line
            raise AssertionError("the bot exited:\n" + "".join(seen))

        line = await asyncio.wait_for(retry_line(), 120)
        bot.send_signal(signal.SIGTERM)
        code, rest = await finish(bot)
    finally:
        if bot.returncode is None:
            bot.kill()
        await fake.close()
    output = "".join(seen) + rest
    assert "WARNING discord.client: no connection to Discord (" in line and "; trying again in" in line
    assert "Traceback" not in output, output
    assert code == 0, output
