"""Shared fixtures: a tiny random Stable Diffusion model saved once per test session; for setup-error tests a port
that refuses connections and a way to run a child process that obeys file permissions even as root."""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random SD pipeline on disk, loadable with StableDiffusionPipeline.from_pretrained."""
    from trainer.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    """The tiny pipeline loaded on CPU in fp32 (shared: tests must leave no adapters active)."""
    from trainer.models.loading import load_pipeline

    return load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline on disk (two text encoders), loadable with StableDiffusionXLPipeline."""
    from trainer.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl-model"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_sdxl_model_dir):
    """The tiny SDXL pipeline loaded on CPU in fp32 (shared: tests must leave no adapters active)."""
    from trainer.models.loading import load_pipeline

    return load_pipeline(str(tiny_sdxl_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A local TCP port that refuses connections (bound, never listening), like a server that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _obey_file_permissions() -> None:
    """preexec_fn: drop root's power to ignore permission bits (the child's exec then starts without it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _no_change() -> None:
    pass


@pytest.fixture(scope="session")
def obey_permissions(tmp_path_factory):
    """A preexec_fn under which a child cannot write in a chmod 500 directory, even when the tests run as root (CI
    does); None when this machine cannot arrange that."""
    if os.geteuid() != 0:
        return _no_change
    read_only = tmp_path_factory.mktemp("read-only")
    read_only.chmod(0o500)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(read_only / 'x')!r}, 'w')"],
                               preexec_fn=_obey_file_permissions, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        read_only.chmod(0o700)
    return _obey_file_permissions if probe.returncode != 0 else None
