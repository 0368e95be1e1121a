"""Guard: every __global__ kernel (the extension's in csrc/, the test kernels in tests/emulated/kernels/) has an
emulated test (kernel_registry.py), or is listed there as a tensor-core kernel tested on the GPU only. Needs no
build."""

import os
import re

import pytest

import emu_sources
from kernel_registry import GPU_ONLY_KERNELS, KERNEL_TESTS

pytestmark = pytest.mark.emulated

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = emu_sources.REPO
KERNEL_ROOTS = ("csrc", os.path.join("tests", "emulated", "kernels"))
SOURCE_EXTENSIONS = (".cu", ".cuh", ".h", ".hpp", ".cpp", ".inl")
# `__global__ void name(`, also with a template head before it or __launch_bounds__(...) between.
GLOBAL_KERNEL = re.compile(
    r"__global__\s+(?:static\s+)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\("
)
TENSOR_CORE = re.compile(r"\b(?:mma|wgmma|cp\.async\.bulk|cp\.reduce\.async\.bulk)\b|nvcuda::wmma|__pipeline|cuda::ptx")


def kernels_in_csrc():
    """{kernel name: [files defining it, relative to the repository]} over the kernel roots, comments skipped."""
    found = {}
    for kernel_root in KERNEL_ROOTS:
        for root, _, files in os.walk(os.path.join(REPO, kernel_root)):
            for f in sorted(files):
                if f.endswith(SOURCE_EXTENSIONS):
                    path = os.path.join(root, f)
                    with open(path, encoding="utf-8") as fh:
                        text = emu_sources._blank_comments(fh.read())
                    for name in GLOBAL_KERNEL.findall(text):
                        found.setdefault(name, []).append(os.path.relpath(path, REPO))
    return found


def test_the_scan_finds_the_known_kernels():
    found = kernels_in_csrc()
    for name in ("row_scale_kernel", "col_dot_partial_kernel", "merge_kernel", "planted_missing_sync_kernel"):
        assert name in found


def test_every_kernel_has_an_emulated_test_or_is_gpu_only():
    found = kernels_in_csrc()
    missing = sorted(set(found) - set(KERNEL_TESTS) - set(GPU_ONLY_KERNELS))
    assert not missing, (
        f"__global__ kernels without an emulated test: {', '.join(f'{k} ({found[k][0]})' for k in missing)}. Add a "
        "test under tests/emulated and list it in kernel_registry.KERNEL_TESTS (or, for a tensor-core kernel, "
        "in GPU_ONLY_KERNELS with its GPU test)."
    )


def test_registry_names_only_existing_kernels():
    found = kernels_in_csrc()
    stale = sorted((set(KERNEL_TESTS) | set(GPU_ONLY_KERNELS)) - set(found))
    assert not stale, f"kernel_registry.py lists kernels that no longer exist: {stale}"
    both = sorted(set(KERNEL_TESTS) & set(GPU_ONLY_KERNELS))
    assert not both, f"listed both as emulated and as GPU-only: {both}"
    duplicated = sorted(k for k, files in found.items() if len(files) > 1)
    assert not duplicated, f"kernel names defined more than once (the registry keys on names): {duplicated}"


def test_registry_tests_exist():
    for kernel, tests in KERNEL_TESTS.items():
        assert tests, f"{kernel}: no test listed"
        for entry in tests:
            file, func = entry.split("::")
            path = os.path.join(HERE, file)
            assert os.path.exists(path), f"{kernel}: {file} does not exist"
            with open(path, encoding="utf-8") as fh:
                assert re.search(rf"^def {func}\(", fh.read(), re.M), f"{kernel}: {entry} does not exist"


def test_gpu_only_kernels_are_tensor_core_kernels():
    """Only kernels the emulation cannot run may skip it: their source must use tensor-core instructions."""
    found = kernels_in_csrc()
    for kernel in GPU_ONLY_KERNELS:
        with open(os.path.join(REPO, found[kernel][0]), encoding="utf-8") as fh:
            assert TENSOR_CORE.search(fh.read()), f"{kernel} is listed as GPU-only but uses no tensor-core instruction"
