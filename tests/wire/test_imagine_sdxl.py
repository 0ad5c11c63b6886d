"""Wire level, the bot as its own process on a tiny SDXL model (`python -m trainer make-tiny-model --family sdxl`):
/imagine runs end to end, the worker reports the family, and picture shapes are the SDXL sizes."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest
from test_delivery_kill import LiveBots, poll
from wire_support import imagine_options, result_messages

from bench.wire.fake_discord import FakeDiscord
from tests.conftest import REPO_ROOT
from trainer.generation.pnginfo import parse_parameters, read_png_parameters

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOB_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    subprocess.run([sys.executable, "-m", "trainer", "make-tiny-model", "--family", "sdxl", str(directory)],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    return directory


async def test_imagine_on_a_tiny_sdxl_bot(sdxl_model, tmp_path):
    fake = FakeDiscord()
    await fake.start()
    bots = LiveBots(fake, tmp_path, sdxl_model)
    try:
        await bots.start()
        member = fake.member("sdxl-painter")
        interaction = await fake.command(member, "imagine", imagine_options("a red dog at the sea", steps=2, seed=7))
        text = await fake.wait_for(lambda: interaction.text(), 60, "the /imagine answer")
        job_id = int(re.search(r"job (\d+)", text).group(1))
        await poll(lambda: (bots.job(job_id) or {"status": None})["status"] in ("succeeded", "failed"),
                   JOB_TIMEOUT_S, f"job {job_id} to end")
        job = bots.job(job_id)
        assert job["status"] == "succeeded", (job["error"], bots.log())
        await fake.wait_for(lambda: result_messages(fake, job_id), 60, f"job {job_id}'s result post")
        image = (tmp_path / "data" / "images" / str(job_id) / "000.png")
        info = parse_parameters(read_png_parameters(image))
        assert info["Size"] == info["Original size"] == info["Target size"] == "64x64"  # the tiny model's own size

        # The worker said "sdxl" when it became ready, so a shape is an SDXL size (which this tiny model can't make).
        asked = await fake.command(member, "imagine", imagine_options("a red dog", size="portrait", steps=2))
        refusal = await fake.wait_for(lambda: asked.text(), 60, "the answer to a portrait")
        assert asked.ephemeral and "896×1152 is not a size this model can make" in refusal, refusal
    finally:
        await bots.close()
        await fake.close()
        await asyncio.sleep(0)
