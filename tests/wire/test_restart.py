"""Wire level: a job that finished while the bot was away from Discord is announced at the next start, once."""
from __future__ import annotations

import asyncio

import pytest
from wire_support import imagine_options, result_messages, run_imagine

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_restart_delivers_a_finished_undelivered_job_once(booth):
    fake = booth.fake
    admin, member = fake.member("restart-admin", manage_guild=True), fake.member("restarter")
    await booth.answer(await fake.command(admin, "queue", subcommand=["admin", "pause"]))
    await booth.answer(await fake.command(member, "imagine", imagine_options("a red cat", steps=2)))
    job = await booth.latest_job(member)
    await fake.wait_for(lambda: fake.channel_messages(f"job {job.id} is"), what="the status message")

    # The bot loses Discord; meanwhile the queue goes on (another admin resumes it) and the job finishes unannounced.
    await booth.disconnect()
    await booth.services.admin.resume(admin.id)
    finished = await booth.wait_job(job.id)
    assert finished.status == "succeeded" and finished.delivered_at is None
    await booth.stop()
    assert result_messages(fake, job.id) == []

    # A fresh process: services, worker and Discord client. The backlog is announced, in the channel.
    await booth.start()
    delivered = await fake.wait_for(lambda: result_messages(fake, job.id), what="the backlog delivery")

    async def marked():  # once Discord confirmed the post, a moment after the fake answered it
        while (await booth.job(job.id)).delivered_at is None:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(marked(), 30)
    # The old status message is retired right after the result is posted.
    await fake.wait_for(lambda: finished.message_id in fake.deleted_messages, what="the old status message deleted")

    # Reconnecting runs the same backlog delivery again: nothing is announced twice.
    await booth.disconnect()
    await booth.connect()
    assert await booth.services.dispatcher.deliver_backlog() == 0
    await asyncio.sleep(1.0)
    assert len(result_messages(fake, job.id)) == 1

    # Its buttons work in this new client too: their custom_id carries the job id.
    params = await fake.click(member, delivered[0], f"bb:params:{job.id}")
    assert "Steps: 2" in await booth.answer(params)


async def test_the_restarted_bot_runs_new_jobs(booth):
    job, result = await run_imagine(booth, booth.fake.member("after-restart"), "a blue dog", steps=2)
    assert job.status == "succeeded" and booth.fake.file_bytes(result)
