"""The reduction kernels (csrc/cuda/reduce_kernels.cu), emulated: col_dot_reduce (col_dot_partial_kernel and,
with row splits, col_dot_finish_kernel; p in the data dtype, q fp32) and lambda_grads (lambda_grads_partial_kernel
and lambda_grads_finish_kernel), against the CPU primitives and float64."""

import math

import pytest
import torch

from emu_helpers import DTYPES, adapter_idx, assert_reduction_close, matrix, sum_reference

pytestmark = pytest.mark.emulated


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
    p, q = matrix(rows, cols, dtype, strided, seed=1), matrix(rows, cols, torch.float32, strided, seed=2)
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
    p, q = matrix(rows, cols, dtype, seed=4), matrix(rows, cols, torch.float32, strided=True, seed=5)
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


def lambda_grads_reference(q, B, lambda_d, lambda_b):
    """(grad_ld, grad_lb) in float64 with the magnitudes of their terms."""
    t = B.double() * q.double()
    ld_terms, lb_terms = t * lambda_b.double()[:, None], t * lambda_d.double()[None, :]
    return sum_reference(ld_terms), sum_reference(lb_terms.T)


# (out_f, r): empty either way, one element, one chunk, several row chunks, r over one column chunk (256).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (9, 33), (40, 31), (17, 300), (70, 600)])
@pytest.mark.parametrize("strided", [False, True])
def test_lambda_grads(emu, dtype, shape, strided):
    q, B = matrix(*shape, torch.float32, seed=1), matrix(*shape, dtype, strided, seed=2)
    ld, lb = torch.randn(shape[1]), torch.randn(shape[0])
    got, cpu = emu.lambda_grads(q, B, ld, lb), emu.cpu_lambda_grads(q, B, ld, lb)
    (ref_d, mag_d), (ref_b, mag_b) = lambda_grads_reference(q, B, ld, lb)
    assert_reduction_close(got[0], cpu[0], ref_d, mag_d, "grad_lambda_d")
    assert_reduction_close(got[1], cpu[1], ref_b, mag_b, "grad_lambda_b")


def test_col_dot_reduce_refuses_more_adapters_than_a_grid_holds(emu):
    p = torch.zeros(0, 1)
    # refused by the shared params filling (kernel_prims.h) before the launcher's own invalid-configuration check
    with pytest.raises(RuntimeError, match="at most 65535 adapters|invalid configuration"):
        emu.col_dot_reduce(p, p, torch.zeros(0, dtype=torch.int64), 65536)


def test_mixed_reduction_reads_each_row_once_whatever_the_adapter_count(emu):
    """Rows are grouped by adapter on the device before the reduction, so col_dot_partial_kernel reads each row once
    whether the 16 adapters the rows use are 16 of 16 or 16 of 1,000 registered. What grows with the table is one
    load of two segment bounds per block (and the (K, C) zeros every unused adapter's gradient is): below 2x the
    sectors here, where a scan of every row for every adapter loads the index for each of the 1,000 (about 40x)."""
    import json

    rows, cols = 512, 64
    p, q = matrix(rows, cols, torch.bfloat16, seed=1), matrix(rows, cols, torch.float32, seed=2)
    used = torch.arange(16) * 37  # 16 distinct adapters, spread over 0 .. 555
    idx = used[torch.arange(rows) % 16]
    loads = {}
    for k in (16, 1000):
        adapters = idx if k == 1000 else torch.arange(rows) % 16
        emu.trace_start(0)
        try:
            got = emu.col_dot_reduce(p, q, adapters, k)
        finally:
            launches = json.loads(emu.trace_stop())
        partial = [entry for entry in launches if "col_dot_partial_kernel" in entry["kernel"]]
        loads[k] = sum(entry["load"]["sectors"] for entry in partial)
        ref, mag = col_dot_reference(p, q, adapters, k)
        assert_reduction_close(got, emu.cpu_col_dot_reduce(p, q, adapters, k), ref, mag, f"{k} adapters")
    assert loads[1000] <= 2 * loads[16], loads


def max_abs_operands(dtype, seed):
    """Tensors that take every path of the max-abs kernels: several blocks with a second grid-stride step (fp32),
    a single element, a base one element past 16-byte alignment (element by element), dense but not contiguous (a
    transpose: read in storage order), and not dense (a strided slice: copied first)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(300, 171, generator=g).to(dtype),
        torch.randn(1, generator=g).to(dtype),
        torch.randn(1000, generator=g).to(dtype)[1:],
        torch.randn(64, 48, generator=g).to(dtype).t(),
        torch.randn(40, 60, generator=g).to(dtype)[:, ::3],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_max_abs(emu, dtype, count):
    """max |t| of each of 1 to 5 tensors in one call, exact (a maximum rounds nothing), equal to the CPU backend's."""
    ts = max_abs_operands(dtype, seed=count)[-count:]
    want = [t.abs().max().double().item() for t in ts]
    assert emu.max_abs(ts) == want
    assert emu.cpu_max_abs(ts) == want
    mixed = [ts[0], torch.randn(7), torch.randn(5, 9).half()]  # one call takes any mix of dtypes
    assert emu.max_abs(mixed) == [t.abs().max().double().item() for t in mixed]


@pytest.mark.parametrize("where", [0, 17, 51299])  # a 16-byte chunk's first value, inside a chunk, the last value
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_max_abs_sees_nan_and_inf(emu, where, bad):
    """A NaN or an infinity anywhere makes that tensor's maximum +inf (so the safe merge's bound cannot pass it);
    the other tensors' maxima are untouched."""
    ts = max_abs_operands(torch.float32, seed=0)[:3]
    ts[0].view(-1)[where] = bad
    got = emu.max_abs(ts)
    assert got[0] == float("inf")
    assert not math.isfinite(emu.cpu_max_abs(ts)[0])  # the CPU's inf-norm: NaN for a NaN
    assert got[1:] == [t.abs().max().item() for t in ts[1:]]
