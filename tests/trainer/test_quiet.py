"""trainer/quiet.py: the libraries' notices, bars and deprecation warnings are off, unless debugging."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

# Loads the tiny pipeline the old way (torch_dtype), which makes diffusers warn and draw its loading bar.
LOAD_THE_OLD_WAY = """
import sys, torch
from trainer.quiet import quiet_libraries
quiet_libraries()
from diffusers import StableDiffusionPipeline
StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None)
"""


def _load(tiny_model_dir, **env) -> str:
    done = subprocess.run([sys.executable, "-c", LOAD_THE_OLD_WAY, str(tiny_model_dir)], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_library_noise_is_off_and_shows_when_debugging(tiny_model_dir):
    assert _load(tiny_model_dir, BOOTHBOT_LOG_LEVEL="info") == ""
    debug = _load(tiny_model_dir, BOOTHBOT_LOG_LEVEL="debug")
    assert "`torch_dtype` is deprecated" in debug and "Loading pipeline components" in debug


def test_every_subcommand_takes_debug(tmp_path):
    from trainer.__main__ import main

    assert main(["make-tiny-model", str(tmp_path / "tiny"), "--debug"]) == 0
