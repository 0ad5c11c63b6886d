"""Choose a C++ compiler whose libraries can be loaded beside torch, before compiling any package with it.

AOTInductor links each package's wrapper with the C++ compiler torch finds (`CXX`, else `g++`). A compiler from
another GCC than the one whose libstdc++ this process runs on may link its own libstdc++ into the package
statically; the package's copy and the process's then disagree about the standard locale, and loading the package
crashes the process inside torch's loader (a std::regex parsing "cuda:0"). The lent H200's image sets
CXX=/opt/gcc/bin/g++ and every package it built crashed that way, tiny ones too (docs/BENCHMARKS.md).

So each candidate (torch's choice first, then the usual names on PATH) builds a small library that does what the
loader does first, and a child process that has torch loaded runs it; the first candidate that survives is used.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE_SOURCE = r"""
#include <regex>
#include <string>

extern "C" int boothbot_probe() {
  std::smatch match;
  std::string device = "cuda:0";
  return std::regex_match(device, match, std::regex("(cpu|cuda|xpu|mps)(:([0-9]+))?")) ? 1 : 0;
}
"""
# torch first: the process that loads a package has torch's C++ runtime loaded before the package.
LOAD_PROBE = "import ctypes, sys, torch; sys.exit(0 if ctypes.CDLL(sys.argv[1]).boothbot_probe() == 1 else 3)"
FALLBACKS = ("g++", "c++", "clang++")
TIMEOUT_S = 120


def torch_compiler() -> str:
    """The compiler inductor would use here (`CXX`, else g++)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch found none; the fallbacks say so
        return os.environ.get("CXX", FALLBACKS[0])


def candidates(first: str) -> list[str]:
    """`first`, then the fallbacks found on PATH, each real compiler once."""
    found, seen = [], set()
    for name in (first, *FALLBACKS):
        path = shutil.which(name)
        if path is None or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        found.append(path)
    return found


def problem_with(compiler: str, work_dir: Path) -> str | None:
    """Why libraries `compiler` builds cannot be loaded beside torch, or None."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"probe-{os.getpid()}-{Path(compiler).name}"  # two compiling processes may check at once
    source, library = work_dir / f"{stem}.cpp", work_dir / f"{stem}.so"
    source.write_text(PROBE_SOURCE)
    try:
        built = subprocess.run([compiler, "-shared", "-fPIC", "-std=c++17", "-o", str(library), str(source)],
                               capture_output=True, text=True, timeout=TIMEOUT_S)
        if built.returncode != 0:
            return f"it could not build a library: {(built.stderr.strip().splitlines() or ['?'])[-1][:200]}"
        loaded = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(library)], capture_output=True, text=True,
                                timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        source.unlink(missing_ok=True)
        library.unlink(missing_ok=True)
    if loaded.returncode < 0:
        return f"a library it built crashed the process loading it beside torch (signal {-loaded.returncode})"
    if loaded.returncode != 0:
        return f"a library it built did not work beside torch (exit {loaded.returncode})"
    return None


def choose_compiler(work_dir: Path) -> tuple[str | None, list[str]]:
    """(the compiler to build packages with, or None; one line per candidate refused, saying why)."""
    refused = []
    for compiler in candidates(torch_compiler()):
        problem = problem_with(compiler, work_dir)
        if problem is None:
            return compiler, refused
        refused.append(f"{compiler}: {problem}")
    if not refused:
        refused.append(f"no C++ compiler found ({', '.join(FALLBACKS)} or $CXX)")
    return None, refused


def use_compiler(compiler: str) -> None:
    """Make inductor build with `compiler` in this process."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.cxx = (None, compiler)
