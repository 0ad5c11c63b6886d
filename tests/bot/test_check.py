"""`python -m bot check`: one line per finding, non-zero exit on problems, never a Discord connection."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bot.check import run_check
from bot.store.database import find_migrations

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.abcdefghijklmnopqrstuvwxyz0123456789AB"


def check_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BOOTHBOT_", "HF_")) and k != "DISCORD_TOKEN"}
    env.update({"DISCORD_TOKEN": TOKEN, "BOOTHBOT_DATA_DIR": str(tmp_path / "data"), "BOOTHBOT_DEVICE": "cpu",
                "HF_HOME": str(tmp_path / "hf-home")})  # an empty Hugging Face cache: nothing downloaded
    env.update(overrides)
    return env


def start_check(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bot", "check", "--env-file", "/nonexistent", *args],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def check_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return finish(start_check(env, *args))


def _flux_file(path):
    """A .safetensors file laid out as Flux's transformer is (its header is what the check reads)."""
    from safetensors.numpy import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros(1, np.float32)}, str(path))
    return path


@pytest.fixture(scope="module")
def model_checks(tmp_path_factory, tiny_model_dir) -> dict[str, subprocess.CompletedProcess]:
    """`python -m bot check` on each kind of BOOTHBOT_MODEL, run side by side (each spends seconds importing torch)."""
    tmp = tmp_path_factory.mktemp("checks")
    cases = {
        "local": {"BOOTHBOT_MODEL": str(tiny_model_dir), "OMP_NUM_THREADS": "1"},  # with --gpu, below
        "hub": {"BOOTHBOT_MODEL": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        "hub-offline": {"BOOTHBOT_MODEL": "someone/some-model", "HF_HUB_OFFLINE": "1"},
        "missing": {"BOOTHBOT_MODEL": str(tmp / "models" / "sd15.safetensors")},
        "flux": {"BOOTHBOT_MODEL": str(_flux_file(tmp / "flux1-dev.safetensors"))},
    }
    running = {}
    for name, overrides in cases.items():
        (tmp / name).mkdir()
        running[name] = start_check(check_env(tmp / name, **overrides), *(["--gpu"] if name == "local" else []))
    return {name: finish(proc) for name, proc in running.items()} | {"tmp": tmp}


def line(output: str, topic: str) -> str:
    found = [l for l in output.splitlines() if l.split()[1:2] == [topic]]
    assert found, f"no {topic} line in:\n{output}"
    return found[-1]


def test_local_model_directory_is_ready(model_checks, tiny_model_dir):
    done = model_checks["local"]
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert line(out, "model").startswith("ok") and f"local diffusers directory {tiny_model_dir}" in out
    assert line(out, "model").endswith(": Stable Diffusion 1.x")  # read from the model itself
    assert line(out, "settings").startswith("ok")
    assert line(out, "token").startswith("ok") and TOKEN not in out
    assert line(out, "data").startswith("ok") and "is writable" in out
    db_line = line(out, "database")
    assert db_line.startswith("ok") and "journal wal" in db_line and f"latest {find_migrations()[-1].name}" in db_line
    assert (model_checks["tmp"] / "local" / "data" / "boothbot.sqlite3").is_file()
    assert line(out, "gpu").startswith("warn") and "no CUDA GPU" in out  # this CI machine has none
    assert out.rstrip().endswith("ready to run: python -m bot (1 warning(s) above)")


def test_gpu_check_starts_the_worker_and_runs_torch_work(model_checks):
    workers = [l for l in model_checks["local"].stdout.splitlines() if l.split()[1:2] == ["worker"]]
    assert workers[0].startswith("...") and "starting the GPU worker" in workers[0]
    assert workers[1].startswith("ok") and "base model loaded on cpu (float32)" in workers[1]
    assert workers[2].startswith("ok") and "matmuls on cpu" in workers[2] and "FLOP/s" in workers[2]


def test_hub_id_not_downloaded_yet_is_a_warning_that_says_so(model_checks):
    done = model_checks["hub"]
    assert done.returncode == 0, done.stdout + done.stderr
    model = line(done.stdout, "model")
    assert model.startswith("warn")
    assert "not downloaded yet: the first start downloads it" in model


def test_a_model_of_an_unsupported_architecture_is_a_problem_that_names_it(model_checks):
    done = model_checks["flux"]
    assert done.returncode == 1
    model = line(done.stdout, "model")
    assert model.startswith("FAIL") and "is a Flux model, which is not supported yet" in model
    assert "Traceback" not in done.stdout + done.stderr


def test_hub_id_not_downloaded_while_offline_is_a_problem(model_checks):
    done = model_checks["hub-offline"]
    assert done.returncode == 1
    model = line(done.stdout, "model")
    assert model.startswith("FAIL") and "HF_HUB_OFFLINE" in model and "someone/some-model" in model


def test_missing_model_path_is_a_problem(model_checks):
    done = model_checks["missing"]
    missing = model_checks["tmp"] / "models" / "sd15.safetensors"
    assert done.returncode == 1
    model = line(done.stdout, "model")
    assert model.startswith("FAIL") and str(missing) in model and "does not exist" in model
    assert "not ready: " in done.stdout and "problem(s) to fix" in done.stdout


def test_directory_that_is_not_a_model_and_one_missing_a_component(tmp_path, tiny_model_dir):
    report = io.StringIO()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    from bot.check import Report, check_model

    r = Report(out=report)
    check_model(r, str(empty))
    assert r.failed and "no model_index.json" in report.getvalue()

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_model_dir / "model_index.json").read_text())
    r = Report(out=report)
    check_model(r, str(broken))
    assert r.failed and "folder(s) are missing" in report.getvalue() and "unet" in report.getvalue()


def test_settings_problems_are_reported_without_going_further(tmp_path, monkeypatch):
    for key, value in check_env(tmp_path, BOOTHBOT_DTYPE="half").items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()
    assert run_check(env_file=None, out=out) == 1
    text = out.getvalue()
    assert line(text, "settings").startswith("FAIL") and "BOOTHBOT_DTYPE='half'" in text
    assert "database" not in text


def test_missing_token_and_unwritable_data_dir_are_problems(tmp_path, monkeypatch, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = check_env(tmp_path, BOOTHBOT_MODEL=str(tiny_model_dir), BOOTHBOT_DATA_DIR=str(blocker / "data"))
    del env["DISCORD_TOKEN"]
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()
    assert run_check(env_file=None, out=out) == 1
    text = out.getvalue()
    assert line(text, "token").startswith("FAIL") and "discord.com/developers/applications" in text
    assert line(text, "data").startswith("FAIL") and "BOOTHBOT_DATA_DIR" in text

