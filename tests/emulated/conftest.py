"""Fixtures of the emulated-kernel tests (`pytest -m emulated`): the CUDA kernels of csrc/cuda, compiled for the
CPU by g++ through tests/emulated/emu, run on CPU tensors and are compared with the CPU primitives of csrc/cpu."""

import pytest

import emu_build


@pytest.fixture(scope="session")
def emu():
    """torch.ops.vera_emu (built on first use, about a minute on 2 cores; cached in build/emulated)."""
    return emu_build.load()


@pytest.fixture
def block_order(emu):
    """Sets the emulator's block order for one test, and restores the default afterwards."""
    yield emu.set_block_order
    emu.set_block_order("forward", 0)
