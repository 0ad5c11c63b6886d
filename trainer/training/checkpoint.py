"""Resumable training state under out_dir/checkpoint/: one file, written to a temporary name and renamed.

A checkpoint holds the LoRA weights, the optimizer (and fp16 grad-scaler) state, the step, the seconds spent so far,
every random state training draws from (torch CPU and CUDA, numpy, python, the noise generator) and a fingerprint of
what was being trained. A checkpoint whose fingerprint does not match the job asking for it is ignored, so changing
the photos, the seed or any recipe setting starts over instead of mixing two trainings.

The file is read with `torch.load(weights_only=True)`: only tensors and plain containers, never pickled objects.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from trainer.contract.files import write_atomic

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def save_state(out_dir: Path, state: dict) -> Path:
    import torch

    state = {**state, "format": FORMAT_VERSION}
    return write_atomic(checkpoint_dir(out_dir) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(out_dir: Path, fingerprint: str) -> dict | None:
    """The saved state when it belongs to this job (same fingerprint), else None."""
    import torch

    path = checkpoint_dir(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: training starts over rather than failing the job
        return None
    if state.get("format") != FORMAT_VERSION or state.get("fingerprint") != fingerprint:
        return None
    return state


def stamp(out_dir: Path) -> tuple[int, int] | None:
    """Which write of the state file is on disk now (its mtime and size), None when there is none."""
    try:
        info = (checkpoint_dir(out_dir) / STATE_FILE).stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def remove(out_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)


def capture_global_rng() -> dict:
    """torch (CPU + every CUDA device), numpy and python random states, as weights_only-loadable values."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_global_rng(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
