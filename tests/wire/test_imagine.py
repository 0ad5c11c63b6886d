"""Wire level: /imagine end to end on the tiny model — queue message, live status, result with images and persistent
buttons (re-roll, variations, parameters) — plus a 429 on the result post, retried by discord.py."""
from __future__ import annotations

import re

import pytest
from wire_support import STEPS, button_ids, imagine_options, result_messages, run_imagine

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_imagine_happy_path_posts_images_and_buttons_to_the_channel(booth):
    fake = booth.fake
    member = fake.member("painter")
    job, result = await run_imagine(booth, member, "a photo of a red dog", steps=STEPS, count=2, seed=7)

    assert f"<@{member.id}>" in result["content"] and "a red dog" in result["content"]
    files = fake.file_bytes(result)
    assert len(files) == 2 and all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in files.values())
    assert button_ids(result) == [f"bb:reroll:{job.id}", f"bb:params:{job.id}", f"bb:vary:{job.id}:0",
                                  f"bb:vary:{job.id}:1"]
    # The status message (queue place, then progress) was posted with the bot token and retired once done (the delete
    # follows the result post, so it may still be on its way).
    assert job.message_id is not None
    await fake.wait_for(lambda: job.message_id in fake.deleted_messages, what=f"job {job.id}'s status message deleted")
    status = [r for r in fake.requests if r.path.startswith(f"/channels/{fake.channel_id}/messages")
              and f"job {job.id}" in str(r.json)]
    assert any("in the queue" in str(r.json) for r in status), "no queue place was shown"
    assert any(f"step 1/{STEPS}" in str(r.json) for r in status), "no live progress was shown"
    assert (await booth.job(job.id)).delivered_at is not None


async def test_result_buttons_reroll_vary_and_show_parameters(booth):
    fake = booth.fake
    owner, other = fake.member("buttons-owner"), fake.member("buttons-other")
    job, result = await run_imagine(booth, owner, "a blue cat", steps=STEPS, seed=11)

    params = await fake.click(other, result, f"bb:params:{job.id}")
    text = await booth.answer(params)
    assert params.ephemeral and "Steps: 2" in text and "Seed: 11" in text

    reroll = await fake.click(other, result, f"bb:reroll:{job.id}")
    new_id = int(re.search(r"as job (\d+)", await booth.answer(reroll)).group(1))
    rerolled = await booth.wait_job(new_id)
    assert rerolled.owner_id == other.id and rerolled.params["prompt"] == "a blue cat"
    assert rerolled.params.get("seed") is None and rerolled.status == "succeeded"

    vary = await fake.click(owner, result, f"bb:vary:{job.id}:0")
    varied_id = int(re.search(r"as job (\d+)", await booth.answer(vary)).group(1))
    varied = await booth.wait_job(varied_id)
    assert varied.status == "succeeded" and varied.params["init_image"] == job.result["images"][0]
    await fake.wait_for(lambda: result_messages(fake, varied_id), what="the variations")


async def test_rate_limited_result_post_is_retried_and_delivered_once(booth):
    fake = booth.fake
    fake.rate_limit_once("POST", rf"^/channels/{fake.channel_id}/messages$", retry_after=0.3)
    member = fake.member("ratelimited")
    job, _ = await run_imagine(booth, member, "a green dog", steps=STEPS)
    assert fake.rate_limited, "the fake never answered 429"
    assert len(result_messages(fake, job.id)) == 1


async def test_images_over_the_upload_limit_are_sent_as_their_small_copies(booth):
    limit = 4000  # bytes: a 64 px noisy PNG is larger, its small copy fits
    job, result = await run_imagine(booth, booth.fake.member("small-uploads"), "a red dog", steps=2,
                                    upload_limit=limit)
    files = booth.fake.file_bytes(result)
    assert len(files) == 1
    (name, data), = files.items()
    assert len(data) <= limit and not name.endswith(".png"), (name, len(data))
    assert job.params["upload_limit"] == limit


async def test_bad_options_and_unknown_concepts_get_a_next_step(booth):
    fake = booth.fake
    member = fake.member("typo")
    unknown = await fake.command(member, "imagine", imagine_options("a photo of <lora:nosuch:1> dog"))
    text = await booth.answer(unknown)
    assert unknown.ephemeral and "no concept called nosuch" in text
    assert await booth.latest_job(member) is None
