"""With --compile-unet the worker keeps inductor's compiled kernels under the bot's data directory, so the next start
reuses them instead of compiling every image size again (docs/BENCHMARKS.md has the measured start times)."""
from __future__ import annotations

from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import cache_dir

from trainer.generation.fast_unet import keep_compiled_kernels


def test_compiled_kernels_are_kept_under_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    kept = keep_compiled_kernels(tmp_path / "data")
    assert kept == (tmp_path / "data").resolve() / "cache" / "inductor"
    assert Path(cache_dir()) == kept  # where inductor itself now reads and writes (Triton's kernels go below it)


def test_an_operators_own_inductor_cache_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_compiled_kernels(tmp_path / "data") == tmp_path / "mine"
