"""The bot process stays torch-free: what `python -m bot` imports (the client, the services and every cog module,
helpers included) leaves torch and diffusers to the GPU worker process."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_bot_process_imports_no_torch():
    code = ("import pkgutil, sys, importlib, cogs, bot.__main__, bot.app, bot.client; "
            "[importlib.import_module(f'cogs.{m.name}') for m in pkgutil.iter_modules(cogs.__path__)]; "
            "loaded = sorted(n for n in sys.modules if n.startswith('cogs.')); assert len(loaded) >= 10, loaded; "
            "bad = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
