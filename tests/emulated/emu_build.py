"""Builds and loads the emulated-kernel test library (torch.ops.vera_emu): the csrc/cuda kernels compiled by g++
with -DVERA_EMULATE_CUDA (tests/emulated/emu), the CPU reference primitives, and tests/emulated/ext/emu_ops.cpp
(the file list is csrc/sources.py's EMULATED_LIBRARY).

JIT-built with torch.utils.cpp_extension into build/emulated/torch_ext (VERA_EMU_BUILD_DIR overrides
build/emulated); ninja rebuilds only what changed. The first build takes about a minute on 2 cores (the
translation units with torch headers; the kernel units have none). The compile runs niced, in a child process.

    python tests/emulated/emu_build.py      # build (or check) without running the tests
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emu_sources  # noqa: E402

REPO = emu_sources.REPO
NAME = "vera_emu_ops"


def build_root():
    return os.environ.get("VERA_EMU_BUILD_DIR", os.path.join(REPO, "build", "emulated"))


def _build_and_load(verbose=False):
    import torch.utils.cpp_extension as cpp_ext

    root = build_root()
    out = os.path.join(root, "torch_ext")
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    sources = [os.path.join(REPO, p) for p in emu_sources.SOURCES["EMULATED_LIBRARY"]]
    sources += emu_sources.generate(os.path.join(root, "gen"))
    cpp_ext.load(
        name=NAME,
        sources=sources,
        extra_cflags=["-O2", "-std=c++20", "-DVERA_EMULATE_CUDA"],  # C++20 whatever standard torch adds
        extra_include_paths=[os.path.join(REPO, d) for d in emu_sources.SOURCES["EMULATED_INCLUDE_DIRS"]],
        build_directory=out,
        is_python_module=False,
        verbose=verbose,
    )


def load():
    """Returns torch.ops.vera_emu, building the library first if needed (niced, in a child process)."""
    import torch

    if not hasattr(torch.ops.vera_emu, "row_scale"):
        # the build log goes to stderr: callers (e.g. benchmarks/kernel_report.py) keep stdout for their results
        subprocess.run(["nice", "-n", "10", sys.executable, os.path.abspath(__file__)], check=True, stdout=sys.stderr)
        _build_and_load()  # up to date now: ninja only checks, then the library is loaded here
    return torch.ops.vera_emu


if __name__ == "__main__":
    _build_and_load(verbose=True)
