"""Shared fixtures: a tiny random Stable Diffusion model saved once per test session."""
from __future__ import annotations

import os
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
