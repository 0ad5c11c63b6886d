"""The README's promises that a test can keep: its offline CLI example runs as written, CI runs its test command."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def block_after(marker: str) -> list[str]:
    """The lines of the first ```bash block after the line holding `marker`."""
    lines = README[README.index(marker):].splitlines()
    start = lines.index("```bash") + 1
    return lines[start:lines.index("```", start)]


def test_the_offline_cli_example_runs_as_written(tmp_path):
    commands = block_after("tests/test_readme.py runs the commands in the next block")
    assert len(commands) == 3 and all(c.startswith("python3 -m trainer ") for c in commands)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    for command in commands:
        argv = [sys.executable, *shlex.split(command.replace("/tmp/", f"{tmp_path}/"))[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "concept" / "lora.safetensors").is_file()
    assert list((tmp_path / "images").glob("*.png"))


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    command = block_after(".ci/run runs the command in the next block")[0]
    assert command == 'python3 -m pip install -c constraints.txt -e ".[test]" && python3 -m pytest'
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m venv" in ci and ci.rstrip().splitlines()[-1] == command
    bot_install = block_after("**Install and run the bot:**")[0]
    assert bot_install.startswith("python3 -m pip install -c constraints.txt -e . ")
