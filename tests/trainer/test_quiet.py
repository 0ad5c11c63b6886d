"""trainer/quiet.py: the libraries' notices, bars and deprecation warnings are off, unless debugging."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

# Loads the tiny pipeline the old way (torch_dtype), which makes diffusers warn and draw its loading bar, then keeps
# two adapters in the UNet and deletes the active one, as the worker does, which makes peft warn twice.
LOAD_THE_OLD_WAY = """
import sys, torch
from trainer.quiet import quiet_libraries
quiet_libraries()
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None)
for name in ("slot", "concept"):
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name=name)
pipe.unet.set_adapters(["concept"])
pipe.unet.delete_adapters("concept")
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
    assert "Already found a `peft_config`" in debug and "Adapter concept was active which is now deleted" in debug


def test_every_subcommand_takes_debug(tmp_path):
    from trainer.__main__ import main

    assert main(["make-tiny-model", str(tmp_path / "tiny"), "--debug"]) == 0
