"""The merge kernel (csrc/cuda/merge_kernels.cu, merge_kernel in write and check-only mode), emulated: W (+)= alpha *
delta_W with delta_W = diag(lambda_b) B diag(lambda_d) A computed tile by tile in the kernel (no delta tensor), for
(out, in) weights and the transposed (in, out) fan_in_fan_out layout, strided weights and projection slices, ragged
128x128 tiles and r from 1 to several 8-wide k chunks.

The kernel sums r fused multiply-adds in order k = 0..r-1; the CPU primitive (MKL, another order) and any other
correct fp32 implementation agree with the exact result up to the bound of `merge_tolerance`, which both are checked
against: a wrong index, scale or transposition shows as an error of the size of the values themselves, far above it.
"""

import pytest
import torch

from emu_helpers import DTYPES, matrix

pytestmark = pytest.mark.emulated

U32 = 2.0**-24  # unit roundoff of fp32, the op-math dtype of every kernel dtype

# (out_f, in_f, r): empty either way, one element, one whole tile, ragged tiles in both directions (several blocks),
# r of one partial k chunk, exactly one chunk, several chunks with a ragged end.
SHAPES = [(0, 3, 4), (3, 0, 4), (1, 1, 1), (128, 128, 8), (130, 200, 19), (257, 70, 5), (70, 150, 33)]


def adapter(out_f, in_f, r, proj_dtype=torch.float32, strided=False, seed=0):
    """A (r, in_f), B (out_f, r) (strided: views with a row stride larger than their columns) and fp32 lambdas."""
    g = torch.Generator().manual_seed(seed + 100)
    A = matrix(r, in_f, proj_dtype, strided, seed=seed + 1)
    B = matrix(out_f, r, proj_dtype, strided, seed=seed + 2)
    return A, B, torch.rand(r, generator=g) + 0.5, torch.rand(out_f, generator=g) - 0.5


def weight_for(out_f, in_f, dtype, transposed, strided, seed=0):
    rows, cols = (in_f, out_f) if transposed else (out_f, in_f)
    return matrix(rows, cols, dtype, strided, seed=seed) * 4


def reference(w, A, B, ld, lb, alpha, transposed):
    """(exact merged value in float64, tolerance) in weight's layout.

    B_hat = lambda_b B and A_hat = lambda_d A are fp32 products, which every implementation forms alike; their
    product summed in fp32 (any order, fused or not) is within gamma(r) * sum_k |B_hat||A_hat| of the exact sum
    (gamma(n) = n u / (1 - n u)); alpha * d, + w and the final rounding add at most one fp32 rounding each of
    |alpha d| and |w + alpha d| and half an ulp of weight's dtype."""
    bh = (B.float() * lb[:, None]).double()
    ah = (A.float() * ld[:, None]).double()
    d, mag = bh @ ah, bh.abs() @ ah.abs()
    if transposed:
        d, mag = d.t(), mag.t()
    r = A.shape[0]
    a32 = torch.tensor(alpha, dtype=torch.float32).double().item()
    exact = w.double() + a32 * d
    gamma = (r + 1) * U32 / (1 - (r + 1) * U32)
    half_ulp = torch.finfo(w.dtype).eps / 2 * exact.abs() if w.dtype != torch.float32 else 0
    tol = abs(a32) * gamma * mag + 3 * U32 * (exact.abs() + abs(a32) * d.abs()) + half_ulp + 1e-30
    return exact, tol


def assert_merged(got, exact, tol, what):
    err = (got.double() - exact).abs()
    if err.numel():
        worst = (err - tol).argmax()
        assert (err <= tol).all(), (
            f"{what}: error {err.flatten()[worst]:.3g} at flat index {worst.item()} exceeds {tol.flatten()[worst]:.3g}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_merge(emu, dtype, shape, transposed, strided, alpha):
    out_f, in_f, r = shape
    A, B, ld, lb = adapter(out_f, in_f, r, proj_dtype=dtype, strided=strided)
    got = weight_for(out_f, in_f, dtype, transposed, strided)
    cpu = weight_for(out_f, in_f, dtype, transposed, strided)
    exact, tol = reference(got, A, B, ld, lb, alpha, transposed)
    assert emu.merge(got, A, B, ld, lb, alpha, transposed, False) == 0
    emu.cpu_merge_apply(cpu, A, B, ld, lb, alpha, transposed, False)
    assert_merged(got, exact, tol, "emulated kernel")
    assert_merged(cpu, exact, tol, "CPU primitive")


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("pdtype", DTYPES)
def test_merge_projection_dtype_other_than_weight(emu, wdtype, pdtype):
    """Every (weight, projection) dtype pair: VeraLinear keeps an fp32 projection next to a bf16/fp16 weight."""
    A, B, ld, lb = adapter(130, 136, 16, proj_dtype=pdtype)
    got = weight_for(130, 136, wdtype, False, False)
    exact, tol = reference(got, A, B, ld, lb, 1.0, False)
    emu.merge(got, A, B, ld, lb, 1.0, False, False)
    assert_merged(got, exact, tol, f"weight {wdtype}, projection {pdtype}")


def test_merge_r1_is_bit_exact_with_the_cpu(emu):
    """r = 1: delta is a single product, so every correct implementation (and the CPU one) gives the same bits."""
    A, B, ld, lb = adapter(140, 150, 1)
    got, cpu = weight_for(140, 150, torch.float32, False, True), weight_for(140, 150, torch.float32, False, True)
    emu.merge(got, A, B, ld, lb, 0.37, False, False)
    emu.cpu_merge_apply(cpu, A, B, ld, lb, 0.37, False, False)
    assert torch.equal(got, cpu)


def test_merge_unaligned_slices_take_the_element_path(emu):
    """A, B and weight views that start off a 16-byte boundary: no 16-byte loads, same result."""
    A0, B0, ld, lb = adapter(131, 141, 17)
    A, B = A0[:, 1:], B0[1:, :]  # rows start 4 bytes past the allocation
    w = weight_for(131, 141, torch.float16, False, False)[1:, 1:]
    want = w.clone()
    exact, tol = reference(w, A, B, ld[:], lb[1:], 1.0, False)
    emu.merge(w, A, B, ld, lb[1:], 1.0, False, False)
    assert_merged(w, exact, tol, "unaligned")
    emu.cpu_merge_apply(want, A, B, ld, lb[1:], 1.0, False, False)
    assert_merged(want, exact, tol, "unaligned CPU")


def test_merge_column_major_weight(emu):
    """A weight whose contiguous dimension is its first (a transposed view): read and written through its strides."""
    A, B, ld, lb = adapter(70, 90, 9)
    w = weight_for(70, 90, torch.bfloat16, True, False).t()  # (out, in) logical, o fastest in memory
    exact, tol = reference(w, A, B, ld, lb, -1.0, False)
    emu.merge(w, A, B, ld, lb, -1.0, False, False)
    assert_merged(w, exact, tol, "column-major weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (130, 200, 19), (257, 70, 5)])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_merge_check_only(emu, dtype, shape, transposed):
    """Check-only writes nothing and raises the flag exactly when the CPU's exact check refuses."""
    out_f, in_f, r = shape
    A, B, ld, lb = adapter(out_f, in_f, r, proj_dtype=dtype)
    w = weight_for(out_f, in_f, dtype, transposed, strided=True)
    before = w.clone()
    assert emu.merge(w, A, B, ld, lb, 1.0, transposed, True) == 0
    assert torch.equal(w, before)

    lb = lb.clone()
    lb[out_f // 2] = float("nan")  # one row of delta_W is NaN, in the last tile of the grid for odd sizes
    assert emu.merge(w, A, B, ld, lb, 1.0, transposed, True) == 1
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="safe merge refused"):
        emu.cpu_merge_apply(w.clone(), A, B, ld, lb, 1.0, transposed, True)


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_merge_check_only_sees_overflow_in_the_weight_dtype(emu, transposed):
    """Finite in fp32, infinite once rounded to fp16: the check looks at the value that would be stored. The one
    overflowing element sits in the last (ragged) tile."""
    out_f, in_f = 140, 135
    w = torch.full((in_f, out_f) if transposed else (out_f, in_f), 60000.0, dtype=torch.float16)
    A, B = torch.zeros(3, in_f, dtype=torch.float16), torch.zeros(out_f, 3, dtype=torch.float16)
    A[2, in_f - 1], B[out_f - 1, 2] = 100.0, 100.0
    ld, lb = torch.ones(3), torch.ones(out_f)
    assert emu.merge(w, A, B, ld, lb, 1.0, transposed, True) == 1  # 60000 + 10000 > 65504
    assert emu.merge(w, A, B, ld, lb, 0.0001, transposed, True) == 0  # 60000 + 1
    with pytest.raises(ValueError, match="safe merge refused"):
        emu.cpu_merge_apply(w.clone(), A, B, ld, lb, 1.0, transposed, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_then_unmerge_round_trip_matches_cpu(emu, dtype):
    """Merge then unmerge stays within the bound of each step, as on the CPU."""
    A, B, ld, lb = adapter(133, 65, 12, proj_dtype=dtype)
    w = weight_for(133, 65, dtype, transposed=True, strided=False)
    w0 = w.clone()
    for alpha in (1.0, -1.0):
        exact, tol = reference(w, A, B, ld, lb, alpha, True)
        emu.merge(w, A, B, ld, lb, alpha, True, False)
        assert_merged(w, exact, tol, f"alpha {alpha}")
    if dtype == torch.float32:
        torch.testing.assert_close(w, w0, atol=1e-5, rtol=1e-5)


def test_merge_refuses_more_row_tiles_than_a_grid_holds(emu):
    out_f = 65535 * 128 + 1  # 65536 tiles of 128 rows: grid.y is limited to 65535
    w, A, B = torch.zeros(out_f, 1), torch.zeros(1, 1), torch.zeros(out_f, 1)
    with pytest.raises(RuntimeError, match="invalid configuration"):
        emu.merge(w, A, B, torch.ones(1), torch.ones(out_f), 1.0, False, False)


def test_safe_merge_bound_reads_each_operand_once(emu):
    """A safe merge whose finiteness the max-abs bound proves runs the two max-abs kernels (which read W, A, B and
    both lambdas once, together) and the write pass only: no check pass, and no other kernel."""
    import json

    out_f, in_f, r = 200, 136, 12
    A, B, ld, lb = adapter(out_f, in_f, r, proj_dtype=torch.bfloat16)
    w = weight_for(out_f, in_f, torch.bfloat16, transposed=False, strided=False)
    want = w.clone()
    emu.op_vera_merge_(want, A, B, ld, lb, 1.0, False, False)
    emu.trace_start(0)
    try:
        emu.op_vera_merge_(w, A, B, ld, lb, 1.0, False, True)
    finally:
        launches = json.loads(emu.trace_stop())
    assert torch.equal(w, want)
    names = [ev["kernel"].split("<")[0].split("::")[-1] for ev in launches]
    assert names == ["max_abs_partial_kernel", "max_abs_finish_kernel", "merge_kernel"], names
    assert "false>" in launches[2]["kernel"]  # the write pass
    operand_bytes = sum(t.numel() * t.element_size() for t in (w, A, B, ld, lb))
    read = launches[0]["unique_read_bytes_private"] + launches[0]["unique_read_bytes_shared"]
    assert read == operand_bytes
