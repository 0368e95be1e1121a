"""The CPU merge computes delta_W tile by tile (csrc/cpu/prims_cpu.cpp, Prims::merge_apply; docs/DESIGN.md §2.3):
the same values as the full-delta merge it replaced, without an O x I temporary (at most 16 MiB of workspace),
and a safe merge that refuses before writing anything."""

import pytest
import torch

from vera_ext import ops

WORKSPACE_BYTES = 16 << 20  # kMergeWorkspaceBytes (csrc/cpu/prims_cpu.h)


def adapter(out_f, in_f, r, dtype=torch.float32, seed=0, pad=3):
    """A (r, in_f) and B (out_f, r) as strided slices of a larger projection (as layers pass them), lambdas in the
    op-math dtype."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r + pad, in_f + pad, generator=g).to(dtype)[:r, :in_f]
    B = torch.randn(out_f + pad, r + pad, generator=g).to(dtype)[:out_f, :r]
    lam = torch.float64 if dtype == torch.float64 else torch.float32
    return A, B, torch.rand(r, generator=g).to(lam) + 0.5, torch.rand(out_f, generator=g).to(lam) - 0.5


def full_delta_merge(weight, A, B, ld, lb, alpha, fan_in_fan_out):
    """The previous merge: the whole delta_W = B_hat @ A_hat in op math (one GEMM), then W + alpha * delta rounded
    once into W's dtype (the same fp32 products, the same GEMM per output element, the same two roundings)."""
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    wacc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = (B.to(acc) * lb[:, None]) @ (A.to(acc) * ld[:, None])
    if fan_in_fan_out:
        delta = delta.t()
    return (weight.to(wacc) + torch.tensor(alpha, dtype=wacc) * delta.to(wacc)).to(weight.dtype)


def float64_bound(weight, A, B, ld, lb, alpha, fan_in_fan_out):
    """(reference merged value in float64, tolerance) for a merge of `weight` (before).

    B_hat = lambda_b B and A_hat = lambda_d A are op-math products that every implementation forms alike. Their
    product summed in op math in any order (MKL's blocking decides it, and a sub-block may be summed otherwise than
    the whole matrix) is within gamma(r) * sum_k |B_hat||A_hat| of the exact sum (gamma(n) = n u / (1 - n u)); the
    float64 reference itself is within the same bound for fp64 op math (hence 2 gamma). alpha * d and + w add one
    op-math rounding each, the final rounding half an ulp of weight's dtype."""
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    wacc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u = max(torch.finfo(acc).eps, torch.finfo(wacc).eps) / 2
    bh, ah = (B.to(acc) * lb[:, None]).double(), (A.to(acc) * ld[:, None]).double()
    d, mag = bh @ ah, bh.abs() @ ah.abs()
    if fan_in_fan_out:
        d, mag = d.t(), mag.t()
    r = A.shape[0]
    exact = weight.double() + alpha * d
    gamma = (r + 1) * u / (1 - (r + 1) * u)
    half_ulp = torch.finfo(weight.dtype).eps / 2 * exact.abs() + torch.finfo(weight.dtype).tiny
    return exact, 2 * abs(alpha) * gamma * mag + 3 * u * (exact.abs() + abs(alpha) * d.abs()) + half_ulp


def assert_within(got, exact, tol, what=""):
    err = (got.double() - exact).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (
        f"{what}: error {err.flatten()[worst]:.3g} at flat index {worst.item()} exceeds {tol.flatten()[worst]:.3g}"
    )


# Both weight dimensions span several 256 x 512 tiles (the starting tile) with ragged ends, and several workers'
# ranges of tiles, either layout.
BIG = (2100, 2150, 24)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["out_in", "fan_in_fan_out"])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_tiled_merge_equals_the_full_delta_merge(fan_in_fan_out, alpha):
    out_f, in_f, r = BIG
    A, B, ld, lb = adapter(out_f, in_f, r)
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    exact, tol = float64_bound(weight, A, B, ld, lb, alpha, fan_in_fan_out)
    want = full_delta_merge(weight, A, B, ld, lb, alpha, fan_in_fan_out)
    ops.vera_merge_(weight, A, B, ld, lb, alpha, fan_in_fan_out)
    # Tiles and the whole matrix go through the same MKL GEMM, but MKL may sum a sub-block in another order than
    # the whole (it does in fp64): both results are held to the same float64 bound.
    assert_within(want, exact, tol, "full-delta merge")
    assert_within(weight, exact, tol, "tiled merge")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_tiled_merge_other_dtypes(dtype, fan_in_fan_out):
    """fp16/bf16 weights (with an fp32 projection, as VeraLinear keeps it, and with one in their own dtype) and fp64
    (op math fp64; with an fp32 projection the fp32 tile is widened before the add)."""
    out_f, in_f, r = 600, 2200, 8
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    for proj in {torch.float32, dtype}:
        A, B, ld, lb = adapter(out_f, in_f, r, dtype=proj, seed=3)
        got = weight.clone()
        exact, tol = float64_bound(weight, A, B, ld, lb, -1.0, fan_in_fan_out)
        ops.vera_merge_(got, A, B, ld, lb, -1.0, fan_in_fan_out)
        assert_within(got, exact, tol, f"projection {proj}")
        assert_within(full_delta_merge(weight, A, B, ld, lb, -1.0, fan_in_fan_out), exact, tol, "full delta")


def test_tiled_merge_strided_and_column_major_weights():
    out_f, in_f, r = 700, 2100, 6
    A, B, ld, lb = adapter(out_f, in_f, r, seed=4)
    padded = torch.randn(out_f + 2, in_f + 9)
    strided = padded[1:-1, 3:-6]  # row stride past its columns, offset start
    column_major = torch.randn(in_f, out_f).t()  # (out, in) with o contiguous
    for weight in (strided, column_major):
        exact, tol = float64_bound(weight, A, B, ld, lb, 1.0, False)
        ops.vera_merge_(weight, A, B, ld, lb, 1.0, False)
        assert_within(weight, exact, tol)
    before = padded.clone()  # the padding around the strided view is never written
    ops.vera_merge_(strided, A, B, ld, lb, 1.0, False)
    assert torch.equal(padded[0], before[0]) and torch.equal(padded[-1], before[-1])
    assert torch.equal(padded[:, :3], before[:, :3]) and torch.equal(padded[:, -6:], before[:, -6:])


def test_rank_past_one_workspace_chunk_is_summed_in_chunks():
    """r so large that even 64 x 64 tiles need more than 16 MiB of operand slices: r is cut into chunks whose fp32
    sums are added in order (another summation order, so within the float64 bound rather than bit for bit)."""
    out_f, in_f, r = 100, 90, 50000
    A, B, ld, lb = adapter(out_f, in_f, r, seed=6, pad=0)
    ld, lb = ld / 50, lb / 50
    weight = torch.randn(out_f, in_f)
    exact, tol = float64_bound(weight, A, B, ld, lb, 1.0, False)
    ops.vera_merge_(weight, A, B, ld, lb, 1.0, False)
    assert_within(weight, exact, tol)


def test_safe_merge_with_nan_lambda_refuses_and_leaves_weight_byte_identical():
    A, B, ld, lb = adapter(*BIG)
    lb = lb.clone()
    lb[BIG[0] - 1] = float("nan")  # last row of the last tile row
    weight = torch.randn(BIG[1], BIG[0]).t()
    before = weight.clone()
    with pytest.raises(ValueError, match="safe merge refused.*weight left unchanged"):
        ops.vera_merge_(weight, A, B, ld, lb, 1.0, False, True)
    assert torch.equal(weight.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_safe_merge_refuses_overflow_in_fp16_and_accepts_a_close_call(fan_in_fan_out):
    """60000 + 10000 overflows fp16 in one element of the last tile: refused, weight untouched. 65472 + 1 is
    finite: the max-abs bound cannot prove it (65472 is within 0.1% of 65504), so the exact check runs and
    accepts it."""
    out_f, in_f = 600, 2100
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    A, B = torch.zeros(2, in_f), torch.zeros(out_f, 2)
    A[1, in_f - 1], B[out_f - 1, 1] = 100.0, 100.0
    ld, lb = torch.ones(2), torch.ones(out_f)
    weight = torch.full(shape, 60000.0, dtype=torch.float16)
    before = weight.clone()
    with pytest.raises(ValueError, match="safe merge refused"):
        ops.vera_merge_(weight, A, B, ld, lb, 1.0, fan_in_fan_out, True)
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))

    weight = torch.full(shape, 65472.0, dtype=torch.float16)
    want = full_delta_merge(weight, A, B, ld, lb, 0.0001, fan_in_fan_out)  # one nonzero product: exact
    ops.vera_merge_(weight, A, B, ld, lb, 0.0001, fan_in_fan_out, True)
    assert torch.equal(weight, want)


def test_safe_merge_of_a_healthy_adapter_equals_the_plain_merge():
    A, B, ld, lb = adapter(*BIG)
    weight = torch.randn(BIG[0], BIG[1], dtype=torch.bfloat16)
    plain = weight.clone()
    ops.vera_merge_(weight, A, B, ld, lb, 1.0, False, True)
    ops.vera_merge_(plain, A, B, ld, lb, 1.0, False, False)
    assert torch.equal(weight, plain)


def peak_cpu_bytes(fn):
    """(peak of CPU bytes allocated minus freed while fn runs, number of allocations and frees): from the profiler's
    memory events (profile_memory=True), every allocation and free of the CPU allocator in time order, ops' own
    included."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    assert events, "the profiler recorded no memory events"
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, len(events)


def test_merge_extra_memory_is_a_bounded_workspace():
    """A 4096 x 11008 fp32 merge at r = 256 (a 180 MB delta_W when formed whole) allocates at most 16 MiB."""
    out_f, in_f, r = 11008, 4096, 256
    A, B, ld, lb = adapter(out_f, in_f, r, pad=0)
    weight = torch.zeros(out_f, in_f)
    peak, count = peak_cpu_bytes(lambda: ops.vera_merge_(weight, A, B, ld, lb, 1.0, False))
    print(f"merge {out_f}x{in_f} r={r}: peak extra CPU memory {peak} bytes ({count} memory events)")
    assert 0 < peak <= WORKSPACE_BYTES
    # a safe merge of a healthy adapter: the max-abs bound (scalars) instead of the check pass, same workspace
    peak_safe, _ = peak_cpu_bytes(lambda: ops.vera_merge_(weight, A, B, ld, lb, -1.0, False, True))
    print(f"safe merge: peak extra CPU memory {peak_safe} bytes")
    assert 0 < peak_safe <= WORKSPACE_BYTES
    # the probe sees a full temporary: the full-delta merge it replaced peaks at O * I * 4 bytes
    peak_full, _ = peak_cpu_bytes(lambda: full_delta_merge(weight[:1024], A, B[:1024], ld, lb[:1024], 1.0, False))
    assert peak_full >= 1024 * in_f * 4
