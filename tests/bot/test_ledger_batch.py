"""Ledger.claim_matching (several queued /imagine jobs for one batch) and the dispatcher's batching rule, on SQLite."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from bot.jobs.kinds import image_count, imagine_batch_key
from bot.jobs.ledger import Ledger
from trainer.contract.batching import MAX_BATCH_IMAGES
from trainer.contract.imagine_request import DEFAULT_STEPS

GUILD, CHANNEL = 111111111111111111, 333333333333333333
ALICE, BOB, CAROL = 1001, 1002, 1003


@pytest.fixture
def settings(settings):
    return replace(settings, max_queued_jobs=100, trainings_per_day=100)


def take_all(job, taken) -> bool:
    return True


async def test_claims_in_the_fair_order_the_queue_shows(ledger, clock):
    await ledger.submit("train", ALICE, GUILD, CHANNEL, {})
    first = await ledger.claim_next()
    clock.advance(300)
    await ledger.succeed(first.id, {}, gpu_seconds=300.0)  # Alice has used the GPU; Bob and Carol have not
    alice = [await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {}) for _ in range(2)]
    bob = [await ledger.submit("imagine", BOB, GUILD, CHANNEL, {}) for _ in range(2)]
    carol = await ledger.submit("imagine", CAROL, GUILD, CHANNEL, {})
    fair = [entry.job.id for entry in await ledger.queue_view()]
    assert fair[:3] == [bob[0].id, carol.id, bob[1].id]  # the scheduler's order, Alice last

    taken = await ledger.claim_matching(take_all, 3)
    assert [job.id for job in taken] == fair[:3]
    assert all(job.status == "running" and job.started_at == clock.now for job in taken)
    assert [entry.job.id for entry in await ledger.queue_view() if entry.position] == [j.id for j in alice]


async def test_only_matching_jobs_are_claimed_and_the_rest_stay_queued(ledger):
    small = [await ledger.submit("imagine", ALICE + i, GUILD, CHANNEL, {"width": 512, "count": 3}) for i in range(3)]
    wide = await ledger.submit("imagine", BOB + 10, GUILD, CHANNEL, {"width": 768})
    training = await ledger.submit("train", CAROL, GUILD, CHANNEL, {})

    def same_width_up_to_seven_images(job, taken):
        images = sum(j.params["count"] for j in taken) + job.params.get("count", 1)
        return job.params.get("width") == 512 and images <= 7

    taken = await ledger.claim_matching(same_width_up_to_seven_images, 10)
    assert [job.id for job in taken] == [small[0].id, small[1].id]  # a third would make 9 images
    for job in (small[2], wide, training):
        assert (await ledger.get(job.id)).status == "queued"
    assert await ledger.claim_matching(take_all, 0) == []


async def test_nothing_is_claimed_while_the_queue_is_paused(ledger, admin):
    job = await ledger.submit("imagine", ALICE, GUILD, CHANNEL, {})
    await admin.pause(by=9)
    assert await ledger.claim_matching(take_all, 5) == []
    assert (await ledger.get(job.id)).status == "queued"


async def test_concurrent_claimers_never_take_a_job_twice(ledger, other_ledger):
    jobs = [await ledger.submit("imagine", 2000 + i % 9, GUILD, CHANNEL, {"n": i}) for i in range(45)]
    claimed: list[int] = []

    async def claimer(led: Ledger):
        while taken := await led.claim_matching(take_all, 4):
            claimed.extend(job.id for job in taken)
            await asyncio.sleep(0)

    await asyncio.gather(*(claimer(led) for led in [ledger, other_ledger] * 4))
    assert sorted(claimed) == [job.id for job in jobs]  # every job, exactly once


def test_batch_key_treats_missing_options_as_the_engine_defaults():
    plain = imagine_batch_key({"prompt": "a dog"})
    assert plain == imagine_batch_key({"prompt": "a cat", "steps": DEFAULT_STEPS, "cfg": 7,
                                       "scheduler": "DPMPP_2M_Karras "})
    assert plain == imagine_batch_key({"width": None, "height": None, "count": 4, "seed": 3, "negative": "blurry"})
    assert plain != imagine_batch_key({"width": 512, "height": 512})  # the model's size is known only to the worker
    assert imagine_batch_key({"width": 512}) != imagine_batch_key({"height": 512})
    for different in ({"steps": DEFAULT_STEPS + 10}, {"cfg": 7.5}, {"scheduler": "euler_a"}):
        assert imagine_batch_key(different) != plain
    assert imagine_batch_key({"init_image": "/data/images/3/000.png", "strength": 0.5}) is None  # variations: alone
    assert imagine_batch_key({"steps": "many"}) is None  # the worker names the mistake when it runs alone
    assert [image_count(p) for p in ({}, {"count": 3}, {"count": "x"})] == [1, 3, 1]
    assert MAX_BATCH_IMAGES == 8
