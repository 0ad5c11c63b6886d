"""The C++ compiler packages are built with must make libraries that load beside torch (aot_toolchain.py).

Real compilers and real child processes. The bad compiler is a script that, whatever it is asked, builds a library
whose probe dies of SIGSEGV when first called: what a package linked with its own libstdc++ did inside torch's
loader on the lent H200 (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch._inductor.config as inductor_config

from trainer.generation.aot_kernels import AotKernels
from trainer.generation.aot_shapes import ForwardShape
from trainer.generation.aot_toolchain import choose_compiler

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++, as compiling packages does")

BAD_COMPILER = """#!/bin/sh
if [ "$1" = "--version" ]; then exec {gxx} --version; fi
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; shift; fi
  shift
done
[ -n "$out" ] || exit 1
printf 'extern "C" int boothbot_probe() {{ return *(volatile int *)0; }}\\n' > "$out.cpp"
PATH="{path}" exec {gxx} -shared -fPIC -o "$out" "$out.cpp"
"""


@pytest.fixture
def bad_compiler(tmp_path):
    directory = tmp_path / "bad-toolchain"
    directory.mkdir()
    path = directory / "g++"
    path.write_text(BAD_COMPILER.format(gxx=GXX, path=os.environ["PATH"]))  # g++ finds as and ld on PATH
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_compiler_torch_finds_is_kept_when_its_libraries_load(tmp_path):
    with inductor_config.patch({"cpp.cxx": (None, GXX)}):  # whatever CXX this machine sets
        compiler, refused = choose_compiler(tmp_path)
    assert refused == [] and os.path.realpath(compiler) == os.path.realpath(GXX)


def test_a_compiler_whose_libraries_crash_beside_torch_is_passed_over(tmp_path, bad_compiler):
    with inductor_config.patch({"cpp.cxx": (None, str(bad_compiler))}):  # as CXX=... would
        compiler, refused = choose_compiler(tmp_path / "work")
    assert os.path.realpath(compiler) == os.path.realpath(GXX)
    assert len(refused) == 1 and refused[0].startswith(f"{bad_compiler}: ")
    assert "crashed the process loading it beside torch (signal 11)" in refused[0]


def test_with_no_compiler_that_works_the_shapes_are_refused_with_the_reason(tiny_pipeline, tmp_path, bad_compiler,
                                                                            monkeypatch):
    """The worker's real compiling process, with CXX set to the bad compiler and nothing else on PATH: nothing is
    compiled, each shape gets `.failed` with the reason, and the worker refuses them without loading anything."""
    monkeypatch.setenv("CXX", str(bad_compiler))
    monkeypatch.setenv("PATH", str(bad_compiler.parent))
    unet = tiny_pipeline.unet
    shape = ForwardShape((2, 4, 8, 8), (2, 77, unet.config.cross_attention_dim), "float32", "float32", "int64")
    kernels = AotKernels(unet, tmp_path / "aot")
    kernels.want(shape)
    assert kernels.compile_wanted()
    kernels.wait(600)
    assert kernels.adopt() == [] and not kernels.loaded
    assert "no C++ compiler here builds packages that load beside torch" in kernels.refused[shape.name]
    assert not list(kernels.dir.glob("*.pt2"))
    log = (kernels.dir / "compile.log").read_text()
    assert f"not compiling with {bad_compiler}: a library it built crashed" in log
