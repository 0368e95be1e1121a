"""The element-wise kernels (csrc/cuda/elementwise_kernels.cu), emulated, against the CPU primitives: bit-identical
results are expected (same fp32 math, one rounding)."""

import pytest
import torch

from emu_helpers import DTYPES, ONE_GRID_PASS, adapter_idx, matrix

pytestmark = pytest.mark.emulated

# (rows, cols): empty, one element, odd, not a multiple of the warp or block size, several blocks.
SHAPES = [(0, 5), (4, 0), (1, 1), (3, 7), (33, 45), (5, 257)]
BIG = (1100, 1000)  # > ONE_GRID_PASS elements: every thread takes a second grid-stride step


def test_big_shape_needs_a_second_grid_pass():
    assert BIG[0] * BIG[1] > ONE_GRID_PASS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("fp32_out", [False, True])
@pytest.mark.parametrize("col_lam", [False, True], ids=["rows", "rows_and_cols"])
def test_row_scale(emu, dtype, shape, strided, fp32_out, col_lam):
    x = matrix(*shape, dtype, strided)
    lam = torch.randn(shape[0])
    cl = torch.randn(shape[1]) if col_lam else None
    out_dtype = torch.float32 if fp32_out else dtype
    got = emu.row_scale(x, lam, out_dtype, cl)
    assert got.dtype == out_dtype
    assert torch.equal(got, emu.cpu_row_scale(x, lam, out_dtype, cl))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("num_adapters", [None, 1, 3])  # None: no index, every row uses adapter 0
def test_col_scale(emu, dtype, shape, strided, num_adapters):
    x = matrix(*shape, dtype, strided)
    lam = torch.randn(num_adapters or 1, shape[1])
    idx = adapter_idx(shape[0], num_adapters) if num_adapters else None
    assert torch.equal(emu.col_scale(x, lam, idx), emu.cpu_col_scale(x, lam, idx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("num_adapters", [None, 3])
@pytest.mark.parametrize("in_place", [False, True])
def test_scale_add(emu, dtype, shape, strided, num_adapters, in_place):
    base = matrix(*shape, dtype, strided, seed=1)
    z = matrix(*shape, torch.float32, strided, seed=2)  # the GEMM's fp32 output
    lam = torch.randn(num_adapters or 1, shape[1])
    idx = adapter_idx(shape[0], num_adapters) if num_adapters else None
    want = base.clone()
    emu.cpu_scale_add(want, base, z, lam, idx)
    if in_place:  # out aliases base, with base's row stride (the layer adds into a fresh base output)
        out = matrix(*shape, dtype, strided, seed=1)  # a fresh copy of base, same layout
        emu.scale_add(out, out, z, lam, idx)
    else:
        out = torch.full(shape, float("nan"), dtype=dtype)
        emu.scale_add(out, base, z, lam, idx)
    assert torch.equal(out, want)


def test_row_scale_two_grid_passes(emu):
    x = matrix(*BIG, torch.float16, strided=True)
    lam, cl = torch.randn(BIG[0]), torch.randn(BIG[1])
    assert torch.equal(emu.row_scale(x, lam, torch.float32, cl), emu.cpu_row_scale(x, lam, torch.float32, cl))


def test_col_scale_two_grid_passes(emu):
    x = matrix(*BIG, torch.bfloat16)
    lam = torch.randn(4, BIG[1])
    idx = adapter_idx(BIG[0], 4)
    assert torch.equal(emu.col_scale(x, lam, idx), emu.cpu_col_scale(x, lam, idx))


def test_scale_add_two_grid_passes(emu):
    base, z = matrix(*BIG, torch.float32, seed=1), matrix(*BIG, torch.float32, strided=True, seed=2)
    lam = torch.randn(2, BIG[1])
    idx = adapter_idx(BIG[0], 2)
    want = base.clone()
    emu.cpu_scale_add(want, base, z, lam, idx)
    emu.scale_add(base, base, z, lam, idx)
    assert torch.equal(base, want)
