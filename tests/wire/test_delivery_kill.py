"""Wire level, the bot as its own process: kill -9 while a result post is in flight, then restart — the result is
in the channel exactly once, whether Discord never got the post or created the message the bot never heard about.
"""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path

import pytest
from wire_support import imagine_options, result_messages

from bench.wire import live_bot
from bench.wire.fake_discord import FakeDiscord

pytestmark = pytest.mark.asyncio(loop_scope="module")

START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 240.0


def is_result_post(record) -> bool:
    return "bb:reroll:" in json.dumps(record.json or {})


async def poll(predicate, timeout: float, what: str) -> None:
    """Wait for a condition the fake is not told about (the database, a closed socket)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


class LiveBots:
    """Starts `python -m bot run` processes against the fake, one at a time, each logging to its own file."""

    def __init__(self, fake: FakeDiscord, tmp_path: Path, model: Path) -> None:
        self.fake, self.tmp_path = fake, tmp_path
        self.env = live_bot.bot_environment(tmp_path / "data", model, home=tmp_path, guild_ids=str(fake.guild_id),
                                            log_level="info")
        self.db_path = tmp_path / "data" / "boothbot.sqlite3"
        self.process: asyncio.subprocess.Process | None = None
        self.runs = 0

    def _syncs(self) -> int:
        return sum(1 for r in self.fake.requests if r.method == "PUT" and r.path.endswith("/commands"))

    async def start(self) -> None:
        self.runs += 1
        syncs = self._syncs()
        with open(self.tmp_path / f"bot{self.runs}.log", "wb") as log:
            self.process = await live_bot.start_bot(self.fake.api_base, self.fake.gateway_url, self.env,
                                                    env_file=self.tmp_path / "no.env", stdout=log)
        await poll(lambda: self.fake._ws and self._syncs() > syncs or self.process.returncode is not None,
                   START_TIMEOUT_S, "the bot to connect and sync its commands")
        assert self.process.returncode is None, self.log()

    async def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown code runs
        await self.process.wait()
        await poll(lambda: not self.fake._ws, 30, "the gateway connection to drop")

    def log(self) -> str:
        return (self.tmp_path / f"bot{self.runs}.log").read_text(errors="replace")[-4000:]

    def job(self, job_id: int) -> sqlite3.Row:
        connection = sqlite3.connect(self.db_path)
        connection.row_factory = sqlite3.Row
        try:
            return connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        finally:
            connection.close()

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def queue_imagine(bots: LiveBots, member, prompt: str) -> int:
    interaction = await bots.fake.command(member, "imagine", imagine_options(prompt, steps=2))
    text = await bots.fake.wait_for(lambda: interaction.text(), 60, "the queued answer")
    match = re.search(r"job (\d+)", text)
    assert match, text
    return int(match.group(1))


async def test_kill_9_while_the_result_post_is_in_flight_then_restart_posts_it_exactly_once(tmp_path,
                                                                                           tiny_model_dir):
    fake = FakeDiscord()
    await fake.start()
    bots = LiveBots(fake, tmp_path, tiny_model_dir)
    member = fake.member("killed-mid-post")
    try:
        # Run 1 dies with the post in flight, and Discord never got it.
        await bots.start()
        never_arrived = fake.hold("POST", fake.channel_messages_path, match=is_result_post)
        lost = await queue_imagine(bots, member, "a teal boat at sea")
        await asyncio.wait_for(never_arrived.arrived.wait(), JOB_TIMEOUT_S)
        await bots.kill()
        never_arrived.release(create=False)
        assert result_messages(fake, lost) == []

        # Run 2 posts it from the outbox. Then it dies after Discord created the next result but before the bot
        # saw the answer.
        await bots.start()
        await fake.wait_for(lambda: result_messages(fake, lost), JOB_TIMEOUT_S, "the lost result, after restart")
        answer_lost = fake.hold("POST", fake.channel_messages_path, match=is_result_post)
        unconfirmed = await queue_imagine(bots, member, "a teal kite in the wind")
        await asyncio.wait_for(answer_lost.arrived.wait(), JOB_TIMEOUT_S)
        await bots.kill()
        answer_lost.release(create=True)
        await fake.wait_for(lambda: result_messages(fake, unconfirmed), 30, "Discord to create the message")
        assert bots.job(unconfirmed)["delivered_at"] is None  # the bot never heard that it was posted

        # Run 3 posts it again with the same nonce: Discord answers with the message it has.
        await bots.start()
        await poll(lambda: bots.job(unconfirmed)["delivered_at"] is not None, JOB_TIMEOUT_S,
                   "the unconfirmed result to be confirmed")
        await asyncio.sleep(1.0)
        assert len(result_messages(fake, lost)) == 1
        assert len(result_messages(fake, unconfirmed)) == 1
        assert f"j{unconfirmed}c0" in fake.nonce_repeats
        assert bots.job(lost)["delivered_via"] == bots.job(unconfirmed)["delivered_via"] == "channel"
    except AssertionError:
        print(bots.log())
        raise
    finally:
        await bots.close()
        await fake.close()
