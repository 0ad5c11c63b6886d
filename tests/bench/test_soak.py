"""The kill -9 soak, short (bench/soak; docs/RELIABILITY.md): the real bot and worker on the tiny model, members'
/imagine, /train and cancels through the fake Discord, and three kills: the bot twice while an outcome post is in
flight, the worker once. Every job must end with exactly one outcome in the channel and the SQLite file stay intact.

Not in tests/wire: it runs its own fake Discord and bot process on its own event loop, and the wire tier's shared
bot, whose loop would stand still for the soak's minutes, then finds its gateway connection gone.
"""
from __future__ import annotations

import pytest

from bench.soak.report import table
from bench.soak.run import SoakOptions, run_soak

pytestmark = pytest.mark.asyncio(loop_scope="module")

# With this seed the kills are: the bot while an outcome post is held before Discord handles it, the worker, the bot
# again the same way (asserted below, so a change in how the soak draws its choices cannot quietly weaken the test).
SEED = 42


async def test_kill_9_of_bot_or_worker_loses_no_job_and_announces_each_once(tmp_path, tiny_model_dir):
    options = SoakOptions(kills=3, seed=SEED, max_open_jobs=3, pause_s=(0.5, 2.0), settle_s=180, model=tiny_model_dir)
    result = await run_soak(options, tmp_path)
    assert [(k.target, k.during_outcome_post) for k in result.kills] == [
        ("bot", True), ("worker", False), ("bot", True)], table(result)
    assert result.jobs and result.integrity_checks == ["ok"] * 3, table(result)
    assert result.violations == [], table(result)
