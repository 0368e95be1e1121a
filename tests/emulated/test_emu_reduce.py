"""The reduction kernels (csrc/cuda/reduce_kernels.cu), emulated: col_dot_reduce (col_dot_partial_kernel and,
with row splits, col_dot_finish_kernel) and row_dot (row_dot_kernel), against the CPU primitives and float64."""

import pytest
import torch

from emu_helpers import DTYPES, adapter_idx, assert_reduction_close, matrix, sum_reference

pytestmark = pytest.mark.emulated

ROW_DOT_GRID_CAP = 4096 * 8  # rows: 4096 blocks of 8 warps, one warp per row


def col_dot_reference(p, q, idx, num_adapters):
    """(num_adapters, cols) float64 sums of p * q over the rows of each adapter, and their magnitudes."""
    terms = p.double() * q.double()
    a = idx if idx is not None else torch.zeros(p.shape[0], dtype=torch.int64)
    sums, mags = [], []
    for k in range(num_adapters):
        s, m = sum_reference(terms[a == k].reshape(-1, p.shape[1]))
        sums.append(s)
        mags.append(m)
    if not sums:
        return torch.zeros(0, p.shape[1], dtype=torch.float64), torch.zeros(0, p.shape[1], dtype=torch.float64)
    return torch.stack(sums), torch.stack(mags)


# (rows, cols, num_adapters or None for no index). With the launcher's own split choice: the small cases run
# one split (col_dot_partial_kernel only); (300, 40, 3) -> 2 splits, (1000, 100, 4) -> 4, (2000, 65, 1) -> 8.
CASES = [(0, 5, None), (1, 1, None), (7, 33, None), (31, 64, 2), (300, 40, 3), (1000, 100, 4), (2000, 65, None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("strided", [False, True])
def test_col_dot_reduce(emu, dtype, case, strided):
    rows, cols, k = case
    p, q = matrix(rows, cols, dtype, strided, seed=1), matrix(rows, cols, dtype, strided, seed=2)
    idx = adapter_idx(rows, k, seed=3) if k else None
    num_adapters = k or 1
    got = emu.col_dot_reduce(p, q, idx, num_adapters)
    ref, mag = col_dot_reference(p, q, idx, num_adapters)
    assert_reduction_close(got, emu.cpu_col_dot_reduce(p, q, idx, num_adapters), ref, mag, "col_dot_reduce")


def test_col_dot_reduce_cases_cover_row_splits(emu):
    splits = [emu.col_dot_reduce_splits(r, c, k or 1) for r, c, k in CASES]
    assert min(splits) == 1 and max(splits) >= 4, splits


# Forced split counts: more splits than rows leaves chunks empty (their partial sums must be zeros).
@pytest.mark.parametrize("rows,cols,k,splits", [(3, 10, 2, 7), (100, 33, 3, 5), (257, 1, None, 64), (50, 70, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_col_dot_reduce_forced_splits(emu, rows, cols, k, splits, dtype):
    p, q = matrix(rows, cols, dtype, seed=4), matrix(rows, cols, dtype, strided=True, seed=5)
    idx = adapter_idx(rows, k, seed=6) if k else None
    got = emu.col_dot_reduce(p, q, idx, k or 1, splits)
    ref, mag = col_dot_reference(p, q, idx, k or 1)
    assert_reduction_close(got, emu.cpu_col_dot_reduce(p, q, idx, k or 1), ref, mag, f"{splits} splits")


def test_col_dot_reduce_split_count_does_not_change_much(emu):
    """Every split count sums the same terms: the results agree to fp32 rounding."""
    p, q = matrix(600, 48, torch.float32, seed=7), matrix(600, 48, torch.float32, seed=8)
    idx = adapter_idx(600, 3, seed=9)
    results = [emu.col_dot_reduce(p, q, idx, 3, s) for s in (1, 2, 3, 64)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (9, 33), (40, 31), (17, 300)])
@pytest.mark.parametrize("strided", [False, True])
def test_row_dot(emu, dtype, shape, strided):
    p, q = matrix(*shape, dtype, strided, seed=1), matrix(*shape, dtype, seed=2)
    ref, mag = sum_reference((p.double() * q.double()).T)
    assert_reduction_close(emu.row_dot(p, q), emu.cpu_row_dot(p, q), ref, mag, "row_dot")


def test_row_dot_more_rows_than_one_grid(emu):
    rows = ROW_DOT_GRID_CAP + 123  # some warps take a second row
    p, q = matrix(rows, 3, torch.float16, strided=True, seed=1), matrix(rows, 3, torch.float16, seed=2)
    ref, mag = sum_reference((p.double() * q.double()).T)
    assert_reduction_close(emu.row_dot(p, q), emu.cpu_row_dot(p, q), ref, mag, "row_dot")


def test_col_dot_reduce_refuses_more_adapters_than_a_grid_holds(emu):
    p = torch.zeros(0, 1)
    # refused by the shared params filling (kernel_prims.h) before the launcher's own invalid-configuration check
    with pytest.raises(RuntimeError, match="at most 65535 adapters|invalid configuration"):
        emu.col_dot_reduce(p, p, torch.zeros(0, dtype=torch.int64), 65536)
