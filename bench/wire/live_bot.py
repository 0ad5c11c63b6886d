"""The real bot as a separate process (`python -m bot run`), pointed at a fake (or unreachable) Discord.

A short wrapper sets discord.py's REST base and gateway, then calls the same main() as `python -m bot`; everything
else (settings from the environment, services, GPU worker, cogs) is the product as users run it. Tests and benchmarks
use it wherever the bot must be a process of its own: kill -9, exit codes, loop lag measured apart from the fake.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"
POINTED_AT = """
import sys, discord, yarl
discord.http.Route.BASE = sys.argv[1]
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])
from bot.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def bot_environment(data_dir: Path, model: Path | str, *, home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any BOOTHBOT_/HF_ setting or token, plus a CPU bot on `model`.
    `settings`: more BOOTHBOT_* values (keys without the prefix, e.g. guild_ids="1")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOTHBOT_", "HF_")) and k != "DISCORD_TOKEN"}
    env.update({"DISCORD_TOKEN": TOKEN, "BOOTHBOT_DATA_DIR": str(data_dir), "BOOTHBOT_MODEL": str(model),
                "BOOTHBOT_DEVICE": "cpu", "BOOTHBOT_DTYPE": "fp32", "HF_HOME": str(home / "hf-home"),
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update({f"BOOTHBOT_{key.upper()}": str(value) for key, value in settings.items()})
    return env


async def start_bot(api: str, gateway: str, env: dict[str, str], *, env_file: Path, stdout=asyncio.subprocess.PIPE,
                    args: tuple[str, ...] = (), setup: str = "") -> asyncio.subprocess.Process:
    """`python -m bot run --env-file ENV_FILE ARGS` against the Discord at `api` / `gateway`. Output goes to
    `stdout` (a pipe by default, stderr merged into it). `setup`: Python lines run first in the bot process (e.g. a
    test recipe for bot.services.submissions.TRAIN_RECIPE)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", setup + POINTED_AT, api, gateway, "run", "--env-file", str(env_file), *args,
        cwd=REPO_ROOT, env=env, stdout=stdout, stderr=asyncio.subprocess.STDOUT)
