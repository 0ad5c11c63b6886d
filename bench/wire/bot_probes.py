"""Measurements taken inside the real bot process (`python -m bot run` started by bench/wire/live_bot.py): its
event-loop lag and, optionally, a cProfile of the loop thread. Nothing in bot/ knows about them: `SCRIPT` installs
them and then runs the same wrapper as live_bot (discord.py pointed at the fake, then the bot's main()).

The lag samples are written as JSON ({"interval_ms", "samples": [[unix time, lag ms], ...]}) when the bot stops
(SIGTERM), so a benchmark keeps the samples of the phase it cares about.
"""
from __future__ import annotations

import atexit
import cProfile
import json
import os

from bench.loop_probe import LagProbe
from bench.wire import live_bot

LAG_FILE_ENV, PROFILE_FILE_ENV = "BENCH_LOOP_LAG_FILE", "BENCH_PROFILE_FILE"
INTERVAL_S = 0.005
SCRIPT = "from bench.wire.bot_probes import install_from_env; install_from_env()\n" + live_bot.POINTED_AT


def install_from_env() -> None:
    lag_file, profile_file = os.environ.get(LAG_FILE_ENV), os.environ.get(PROFILE_FILE_ENV)
    if lag_file:
        install_lag_probe(lag_file)
    if profile_file:
        profiler = cProfile.Profile()
        profiler.enable()

        def dump() -> None:
            profiler.disable()
            profiler.dump_stats(profile_file)
        atexit.register(dump)


def install_lag_probe(path: str) -> None:
    """Wrap the bot's `serve` so a lag probe runs on its event loop for the process's whole life."""
    import bot.__main__ as entry

    original = entry.serve

    async def serve(settings, **kwargs):
        probe = LagProbe(INTERVAL_S)
        probe.start()
        try:
            return await original(settings, **kwargs)
        finally:
            samples = await probe.stop()
            with open(path, "w", encoding="utf-8") as out:
                json.dump({"interval_ms": INTERVAL_S * 1000,
                           "samples": [[at, round(ms, 3)] for at, ms in zip(probe.times, samples)]}, out)

    entry.serve = serve
