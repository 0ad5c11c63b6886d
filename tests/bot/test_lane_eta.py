"""Queue ETAs with several lanes (GPU workers): that many jobs run at once, each waiting job in the lane that frees
first. Positions stay the fair order."""
from __future__ import annotations

import pytest

from bot.jobs.scheduler import default_duration_s

GUILD, CHANNEL = 111111111111111111, 333333333333333333
ALICE, BOB, CAROL = 1001, 1002, 1003
IMAGINE = default_duration_s("imagine")


async def test_two_lanes_run_two_waiting_jobs_at_once(ledger):
    jobs = [await ledger.submit("imagine", member, GUILD, CHANNEL, {}) for member in (ALICE, BOB, CAROL)]
    assert [await ledger.eta_s(job.id) for job in jobs] == pytest.approx([IMAGINE, 2 * IMAGINE, 3 * IMAGINE])
    ledger.lanes = 2
    ledger.queue.max_age_s = 0  # the plan above was made for one lane
    assert [await ledger.position(job.id) for job in jobs] == [1, 2, 3]
    assert [await ledger.eta_s(job.id) for job in jobs] == pytest.approx([IMAGINE, IMAGINE, 2 * IMAGINE])


async def test_a_long_job_in_one_lane_does_not_hold_up_the_other(ledger, clock):
    ledger.lanes = 2
    training = await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    await ledger.claim(training.id)
    await ledger.record_progress(training.id, 10, 1000, eta_s=600.0)
    waiting = [await ledger.submit("imagine", member, GUILD, CHANNEL, {}) for member in (BOB, CAROL)]
    assert await ledger.eta_s(training.id) == pytest.approx(600.0)
    assert [await ledger.eta_s(job.id) for job in waiting] == pytest.approx([IMAGINE, 2 * IMAGINE])
