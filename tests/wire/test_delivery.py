"""Wire level: a finished job's outcome reaches its owner exactly once, whatever Discord answers to the post.

The fake Discord fails or refuses the result post the way Discord does; discord.py's own HTTP runs unchanged, so
only what discord.py does not absorb itself reaches the bot (it retries 500/502/504 internally, not 503 or 403).
"""
from __future__ import annotations

import asyncio
import json
import re

import pytest
from wire_support import imagine_options, result_messages, run_imagine

pytestmark = pytest.mark.asyncio(loop_scope="session")


def is_result_post(record) -> bool:
    """A channel post carrying /imagine result buttons (whatever the bot's version names it)."""
    return "bb:reroll:" in json.dumps(record.json or {})


async def queue_imagine(booth, member, prompt: str) -> int:
    text = await booth.answer(await booth.fake.command(member, "imagine", imagine_options(prompt, steps=2)))
    match = re.search(r"job (\d+)", text)
    assert match, text
    return int(match.group(1))


async def test_a_server_error_twice_is_retried_and_posts_the_result_once(booth):
    fake = booth.fake
    # 503 is not one of the statuses discord.py retries by itself: both failures reach the bot.
    fake.fail_next("POST", fake.channel_messages_path, 503, times=2, match=is_result_post)
    job, _ = await run_imagine(booth, fake.member("unlucky"), "a green frog on a leaf", steps=2)

    assert len([r for r in fake.failed if is_result_post(r)]) == 2
    await asyncio.sleep(1.0)  # a duplicate would be posted right after the first
    assert len(result_messages(fake, job.id)) == 1
    delivered = await booth.job(job.id)
    assert delivered.delivered_via == "channel" and delivered.delivery_attempts == 2


async def test_a_channel_that_refuses_the_result_sends_it_to_the_owner_by_dm(booth):
    fake = booth.fake
    member, admin = fake.member("dm-owner"), fake.member("dm-admin", manage_guild=True)
    fake.fail_next("POST", fake.channel_messages_path, 403, match=is_result_post)
    job_id = await queue_imagine(booth, member, "a violet heron at dawn")
    job = await booth.wait_job(job_id)
    assert job.status == "succeeded", job.error

    dms = await fake.wait_for(lambda: fake.dm_messages(member, "violet heron"), what="the result by DM")
    await asyncio.sleep(1.0)
    assert len(fake.dm_messages(member, "violet heron")) == 1
    assert fake.file_bytes(dms[0]), "the images travel with the DM"
    assert f"<#{fake.channel_id}>" in dms[0]["content"]  # says where it should have been
    assert result_messages(fake, job_id) == []
    delivered = await booth.job(job_id)
    assert delivered.delivered_via == "dm" and "403 Missing Access" in delivered.delivery_error

    listing = await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "list"]))
    line = next(line for line in listing.splitlines() if line.startswith(f"Job {job_id} "))
    assert "sent to the owner by DM" in line and "403 Missing Access" in line


async def test_restart_delivers_a_result_whose_posts_kept_failing_once(booth):
    fake = booth.fake
    member = fake.member("outage")
    fake.fail_next("POST", fake.channel_messages_path, 503, times=1000, match=is_result_post)
    job_id = await queue_imagine(booth, member, "a grey owl in the rain")
    await booth.wait_job(job_id)

    await fake.wait_for(lambda: any(is_result_post(r) for r in fake.failed), what="a failed result post")
    await asyncio.sleep(0.5)  # the bot records the failed attempt
    await booth.stop()
    stopped = job_row(booth, job_id)
    assert stopped["delivered_at"] is None  # nothing was posted, so it waits in the outbox
    assert stopped["delivery_attempts"] >= 1 and "503" in stopped["delivery_error"]
    fake.clear_failures()  # Discord is back; so is the bot

    await booth.start()
    await fake.wait_for(lambda: result_messages(fake, job_id), what="the result after the restart")
    await asyncio.sleep(1.0)
    assert len(result_messages(fake, job_id)) == 1
    assert (await booth.job(job_id)).delivered_via == "channel"


def job_row(booth, job_id: int):
    """The job's row read straight from the database file while the bot is stopped."""
    import sqlite3

    connection = sqlite3.connect(booth.settings.db_path)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        connection.close()


async def test_forget_retires_the_status_message_of_a_waiting_job_through_the_notifier(booth):
    fake = booth.fake
    admin, member = fake.member("forget-admin", manage_guild=True), fake.member("forget-waiter")
    await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "pause"]))
    try:
        job_id = await queue_imagine(booth, member, "a quiet harbour")
        status = (await fake.wait_for(lambda: fake.channel_messages(f"job {job_id} is"), what="the status message"))[0]
        ask = await fake.command(member, "forget")
        await booth.answer(ask)
        message = ask.callbacks[0]["data"]
        confirm_id = message["components"][0]["components"][0]["custom_id"]
        await fake.click(member, {**ask.original, **message}, confirm_id)
        await fake.wait_for(lambda: "its owner used /forget" in (fake.messages[int(status["id"])].get("content") or ""),
                            what="the status message to say the job was cancelled")
        assert await booth.job(job_id) is None
    finally:
        await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "resume"]))
