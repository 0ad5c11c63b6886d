"""`python -m trainer train|imagine` on a setup problem (the model, the network, the data directory): exit 2 and one
plain `error: ...` line that says what to do, never a traceback; `--debug` or BOOTHBOT_LOG_LEVEL=debug adds it.

All cases run at once as real processes (most fail before torch is imported; the two that reach a hub do import it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def imagine(model: str | Path, *extra: str) -> list[str]:
    return ["imagine", "a photo of a dog", "--out", "OUT", "--model", str(model), "--device", "cpu", *extra]


def train(model: str | Path, *extra: str) -> list[str]:
    return ["train", "--photos", "PHOTOS", "--token", "squidarth", "--class", "man", "--out", "OUT",
            "--model", str(model), "--device", "cpu", *extra]


class NoSuchRepository(BaseHTTPRequestHandler):
    """A Hugging Face hub that has no repository at all (what a typo in a hub id meets)."""

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def empty_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def cases(root: Path, tiny_model_dir: Path, closed_port: int,
          empty_hub: str) -> dict[str, tuple[list[str], dict, bool]]:
    """name -> (arguments, environment changes, whether it must run where chmod applies even as root)."""
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    broken = root / "broken.safetensors"
    broken.write_text("<html><body>502 Bad Gateway</body></html>\n")
    weights = next(tiny_model_dir.glob("unet/*.safetensors"))
    cut_off = root / "cut-off.safetensors"
    cut_off.write_bytes(weights.read_bytes()[:50_000])
    unreadable = root / "unreadable.safetensors"
    shutil.copy(weights, unreadable)
    unreadable.chmod(0)
    data_file = root / "data-is-a-file"
    data_file.write_text("not a directory")
    read_only = root / "read-only-data"
    read_only.mkdir(mode=0o500)
    unreachable_hub = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}
    return {
        "imagine-missing-model": (imagine(root / "models" / "sd15.safetensors"), {}, False),
        "imagine-not-a-model": (imagine(not_a_model), {}, False),
        "imagine-broken-checkpoint": (imagine(broken), {}, False),
        "imagine-cut-off-checkpoint": (imagine(cut_off), {}, False),
        "imagine-unreadable-checkpoint": (imagine(unreadable), {}, True),
        "imagine-hub-offline": (imagine("someone/some-model"), {}, False),
        "imagine-deep-cache-out-of-range": (imagine(tiny_model_dir, "--deep-cache", "0"), {}, False),
        "imagine-hub-unreachable": (imagine("someone/some-model"), unreachable_hub, False),
        "imagine-hub-no-such-model": (imagine("someone/typo-model"), {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": empty_hub},
                                      False),
        "train-missing-model": (train(root / "models" / "sd15.safetensors"), {}, False),
        "train-data-dir-is-a-file": (train(tiny_model_dir), {"BOOTHBOT_DATA_DIR": str(data_file)}, False),
        "train-read-only-data-dir": (train(tiny_model_dir), {"BOOTHBOT_DATA_DIR": str(read_only)}, True),
        "debug-flag": (imagine(root / "models" / "sd15.safetensors", "--debug"), {}, False),
        "debug-log-level": (train(root / "models" / "sd15.safetensors"), {"BOOTHBOT_LOG_LEVEL": "debug"}, False),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir, closed_port, obey_permissions, empty_hub):
    root = tmp_path_factory.mktemp("cli-errors")
    running = {}
    try:
        for name, (args, changes, needs_permissions) in cases(root, tiny_model_dir, closed_port, empty_hub).items():
            if needs_permissions and obey_permissions is None:
                continue
            home = tmp_path_factory.mktemp(name)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOTHBOT_", "HF_"))}
            env.update({"HF_HOME": str(home / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "BOOTHBOT_DATA_DIR": str(home / "data")})
            for key, value in changes.items():
                if value is None:
                    del env[key]
                else:
                    env[key] = value
            args = [str(home / a) if a in ("OUT", "PHOTOS") else a for a in args]
            running[name] = subprocess.Popen(
                [sys.executable, "-m", "trainer", *args], cwd=home, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=obey_permissions if needs_permissions else None)
        done = {}
        for name, proc in running.items():
            output, _ = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, output)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
        (root / "read-only-data").chmod(0o700)
    return done | {"root": root}


def plain_error(outcomes, name: str, *message: str) -> str:
    """Exit 2, no traceback, and the last line is `error: ...` with every given part."""
    if name not in outcomes:
        pytest.skip("this machine cannot run a process that obeys file permissions")
    done = outcomes[name]
    assert "Traceback" not in done.stdout, done.stdout
    assert done.returncode == 2, done.stdout
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("error: "), done.stdout
    for part in message:
        assert part in last, f"{part!r} not in {last!r}"
    return last


@pytest.mark.parametrize("command", ["imagine", "train"])
def test_missing_model_path(outcomes, command):
    missing = outcomes["root"] / "models" / "sd15.safetensors"
    plain_error(outcomes, f"{command}-missing-model", f"{missing} does not exist: give a hub id such as",
                "a local diffusers directory, or a .safetensors/.ckpt file")


def test_deep_cache_out_of_range(outcomes):
    plain_error(outcomes, "imagine-deep-cache-out-of-range", "--deep-cache must be from 1 to 10", "not 0")


def test_directory_that_is_not_a_model(outcomes):
    plain_error(outcomes, "imagine-not-a-model", "is a directory but has no model_index.json",
                "save one with pipe.save_pretrained")


def test_checkpoint_that_is_not_a_safetensors_file(outcomes):
    plain_error(outcomes, "imagine-broken-checkpoint",
                f"{outcomes['root'] / 'broken.safetensors'} is not a readable .safetensors file",
                "download it again, or point BOOTHBOT_MODEL (or --model) at a local copy")


def test_checkpoint_cut_off_by_an_interrupted_download(outcomes):
    plain_error(outcomes, "imagine-cut-off-checkpoint", f"{outcomes['root'] / 'cut-off.safetensors'} is cut off",
                "of", "bytes): download it again")


def test_checkpoint_this_user_cannot_read(outcomes):
    plain_error(outcomes, "imagine-unreadable-checkpoint",
                f"cannot read {outcomes['root'] / 'unreadable.safetensors'} (Permission denied)",
                "make it readable for this user")


def test_hub_model_not_downloaded_while_offline(outcomes):
    plain_error(outcomes, "imagine-hub-offline", "the base model someone/some-model is not in the local Hugging Face",
                "HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE for the first start")


def test_hub_model_not_downloaded_and_the_hub_refuses_the_connection(outcomes, closed_port):
    plain_error(outcomes, "imagine-hub-unreachable", "the base model someone/some-model is not in the local",
                f"the hub at http://127.0.0.1:{closed_port} cannot be reached", "Connection refused",
                "check this machine's internet connection")


def test_hub_model_that_does_not_exist(outcomes):
    plain_error(outcomes, "imagine-hub-no-such-model", "the Hugging Face hub at http://127.0.0.1:",
                "has no model someone/typo-model (or it is private or gated): check the spelling")


def test_data_directory_that_is_a_file(outcomes):
    data_file = outcomes["root"] / "data-is-a-file"
    plain_error(outcomes, "train-data-dir-is-a-file", f"BOOTHBOT_DATA_DIR: cannot write in {data_file / 'cache'}",
                "set BOOTHBOT_DATA_DIR to a directory this user can write in")


def test_data_directory_that_is_not_writable(outcomes):
    read_only = outcomes["root"] / "read-only-data"
    plain_error(outcomes, "train-read-only-data-dir",
                f"BOOTHBOT_DATA_DIR: cannot write in {read_only / 'cache'} (Permission denied)")


@pytest.mark.parametrize("name", ["debug-flag", "debug-log-level"])
def test_debug_shows_the_traceback_then_the_plain_line(outcomes, name):
    done = outcomes[name]
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stdout and "ModelNotFound" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("error: ")
