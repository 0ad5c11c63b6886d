"""The package compatibility probe: passes on the tested set, and names the fix for a broken one.

The broken set is the one a fresh `pip install -e .` resolved on 2026-11-30 before the pins: transformers 5.24.0
(which refuses peft < 0.22) beside peft 0.21.2. The end-to-end test installs that transformers release from the
package registry into a folder put first on PYTHONPATH, then runs the real `bot check` and the real worker on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from trainer.contract import protocol
from trainer.compat import CONSTRAINTS, check_stack, explain, installed_versions, out_of_tested_range

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKEN_TRANSFORMERS = "5.24.0"
# What transformers 5.24.0 raises from transformers/integrations/peft.py with peft 0.21.2 installed.
PEFT_REFUSED = ("The version of PEFT you are using is not compatible, please use a version >= 0.22.0 "
                "(installed: 0.21.2)")


def test_the_installed_set_trains_and_loads_a_lora(tmp_path):
    stamp = tmp_path / "stack-check.json"
    report = check_stack(stamp=stamp)
    assert report.ok, report.detail
    assert report.seconds > 0
    assert json.loads(stamp.read_text()) == report.versions == installed_versions()
    assert report.out_of_range == []  # the constraints file pins versions inside pyproject's ranges

    again = check_stack(stamp=stamp)  # same versions: the probe is not run again
    assert again.ok and again.seconds == 0.0


def test_a_stamp_from_other_versions_does_not_skip_the_probe(tmp_path):
    stamp = tmp_path / "stack-check.json"
    stamp.write_text(json.dumps(installed_versions() | {"peft": "0.0.1"}))
    report = check_stack(stamp=stamp)
    assert report.ok and report.seconds > 0
    assert json.loads(stamp.read_text()) == installed_versions()


def test_explain_names_the_package_that_disagrees_and_the_command():
    versions = installed_versions() | {"transformers": "5.24.0", "peft": "0.21.2"}
    text = explain(ImportError(PEFT_REFUSED), versions)
    assert text.startswith("installed transformers 5.24.0 needs peft >= 0.22.0 (installed: peft 0.21.2)")
    assert "python3 -m pip install -c constraints.txt -e ." in text and CONSTRAINTS.is_file()

    other = explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied\nmore"), versions)
    assert "transformers 5.24.0" in other and "RuntimeError: mat1 and mat2 shapes cannot be multiplied;" in other


def test_versions_outside_the_declared_ranges_are_listed():
    declared = {line.split(">")[0].split("<")[0].strip() for line in metadata.requires("boothbot")}
    assert {"transformers", "peft", "diffusers", "torch"} <= declared
    outside = out_of_tested_range({"transformers": "5.24.0", "peft": "0.21.2"})
    assert outside == ["transformers 5.24.0 (tested: <5.24,>=5.17)"]


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """transformers 5.24.0 alone (no dependencies) in a folder that goes first on PYTHONPATH."""
    target = tmp_path_factory.mktemp("broken-site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           f"transformers=={BROKEN_TRANSFORMERS}"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"could not install transformers {BROKEN_TRANSFORMERS} from the registry:\n{done.stderr}")
        pytest.skip(f"no package registry here: {done.stderr.strip().splitlines()[-1:]}")
    return target


def broken_env(broken_site: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTHBOT_") and k != "DISCORD_TOKEN"}
    env.update({"PYTHONPATH": os.pathsep.join([str(broken_site), str(REPO_ROOT)]), "HF_HUB_OFFLINE": "1",
                "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **extra})
    return env


def test_bot_check_says_not_ready_with_the_broken_set(broken_site, tmp_path, tiny_model_dir):
    env = broken_env(broken_site, tmp_path, BOOTHBOT_MODEL=str(tiny_model_dir), BOOTHBOT_DEVICE="cpu",
                     BOOTHBOT_DATA_DIR=str(tmp_path / "data"), DISCORD_TOKEN="x" * 24 + "." + "y" * 6 + "." + "z" * 27)
    done = subprocess.run([sys.executable, "-m", "bot", "check", "--env-file", "/nonexistent"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    packages = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["packages"]]
    assert packages[0].startswith("FAIL") and "installed transformers 5.24.0 needs peft >= 0.22.0" in packages[0]
    assert "pip install -c constraints.txt -e ." in packages[0]
    assert any(line.startswith("warn") and "transformers 5.24.0 (tested: <5.24,>=5.17)" in line for line in packages)
    assert done.stdout.rstrip().splitlines()[-1].startswith("not ready:")
    assert "Traceback" not in done.stdout + done.stderr


def test_the_worker_refuses_to_start_with_the_broken_set(broken_site, tmp_path, tiny_model_dir):
    env = broken_env(broken_site, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "trainer", "worker", "--model", str(tiny_model_dir), "--device",
                               "cpu", "--data-dir", str(tmp_path / "data")], cwd=REPO_ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # stdin stays open (a closed one means "the bot went away"): the worker must exit by itself.
    output = worker.stdout.read()
    worker.wait(timeout=60)
    worker.stdin.close()
    stdout = "\n".join(line for line in output.splitlines() if line.startswith("{"))
    events = [protocol.decode(line) for line in stdout.splitlines() if line.strip()]
    assert worker.returncode == 4 and [e["event"] for e in events] == ["fatal"], output
    assert events[0]["error"].startswith("the installed packages cannot train LoRAs: installed transformers 5.24.0 "
                                         "needs peft >= 0.22.0")
    assert "Traceback" in events[0]["detail"]  # for the log at debug level
    assert not (tmp_path / "data" / "cache" / "stack-check.json").exists()
