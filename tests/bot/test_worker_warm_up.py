"""The worker warms up for /imagine before it says it is ready (issue 15: the first /imagine once the worker reports
ready must not pay for making the generation service and capturing its graph). On by default on CUDA only; `on`
here forces it on the CPU with the tiny model."""
from __future__ import annotations

import logging

import pytest

from bot.dispatch.worker_client import WorkerClient, worker_command

pytestmark = pytest.mark.asyncio


async def test_a_warmed_up_worker_made_one_imagine_before_ready_and_serves_the_first_one(tiny_model_dir, tmp_path,
                                                                                          caplog):
    caplog.set_level(logging.INFO, logger="boothbot")
    argv = [*worker_command(model=str(tiny_model_dir), data_dir=tmp_path / "data", device="cpu", dtype="fp32",
                            threads=1), "--warm-up", "on"]
    client = WorkerClient(argv, restart_delays_s=(3600,))
    await client.start()
    try:
        await client.wait_ready(180)
        warm = [r.getMessage() for r in caplog.records if "warmed up for /imagine" in r.getMessage()]
        assert len(warm) == 1, [r.getMessage() for r in caplog.records][-10:]
        end = await client.run(1, "imagine", {"prompt": "a photo of a man", "seed": 1, "steps": 2,
                                             "out_dir": str(tmp_path / "data" / "images" / "1")}, timeout_s=120)
        assert end["event"] == "done" and len(end["result"]["images"]) == 1
        assert not list((tmp_path / "data").rglob("*warm-up*"))  # the warm-up's picture is not left behind
    finally:
        await client.stop()
