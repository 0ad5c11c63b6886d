"""Wire level: the bot with BOOTHBOT_WORKERS=local:cpu,cpu serves two /imagine at once on two lanes, and
`/queue admin workers` shows both lanes. The shared bot is restarted with two workers and back with one after."""
from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest
from wire_support import imagine_options

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def workers_answer(booth, member) -> str:
    """The ephemeral answer to /queue admin workers (once: the fake also records the original response)."""
    interaction = await booth.fake.command(member, "queue", subcommand=["admin", "workers"])
    await booth.answer(interaction)
    return interaction.replies[0]["content"]


async def test_two_lanes_serve_two_imagines_at_once_and_admins_see_both(booth):
    fake, one_lane = booth.fake, booth.settings
    await booth.stop()
    booth.settings = replace(one_lane, workers="local:cpu,cpu")
    try:
        await booth.start()
        await asyncio.gather(*(worker.wait_ready(120) for worker in booth.services.workers))
        admin = fake.member("lanes-admin", manage_guild=True)
        before = await workers_answer(booth, admin)
        assert before.count("🟢 ready · device cpu · 0 jobs run") == 2, before

        members = [fake.member("lane-a"), fake.member("lane-b")]
        asked = await asyncio.gather(*(fake.command(member, "imagine", imagine_options(prompt, steps=steps))
                                       for member, prompt, steps in zip(members, ("a red cat", "a blue dog"), (12, 13))))
        ids = [int(re.search(r"job (\d+)", await booth.answer(interaction)).group(1)) for interaction in asked]
        first, second = [await booth.wait_job(job_id) for job_id in ids]
        assert first.status == second.status == "succeeded", (first.error, second.error)
        assert first.started_at < second.finished_at and second.started_at < first.finished_at  # side by side

        after = await workers_answer(booth, admin)
        assert after.count("**cpu**: 🟢 ready · device cpu · 1 job run") == 2, after
        assert "Only server admins" in await workers_answer(booth, members[0])
    finally:
        await booth.stop()
        booth.settings = one_lane
        await booth.start()
