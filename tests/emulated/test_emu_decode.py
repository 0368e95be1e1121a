"""The fused small-N forward (csrc/cuda/decode_kernels.cu: decode_u_kernel, decode_y_kernel, each instantiated per
row bucket NB and per path: 16-byte loads or element by element), emulated, against float64, within twice the
error of the same computation by PyTorch in the same dtype or by the CPU decode primitive (where N is within its
limit)."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from emu_helpers import DTYPES, adapter_idx, matrix

pytestmark = pytest.mark.emulated


def aligned_slice(rows, cols, dtype, seed):
    """A (rows, cols) view of a wider matrix whose rows stay 16-byte aligned (the row stride is cols plus 16 bytes):
    a projection slice that still takes the 16-byte path when cols is a multiple of 16 bytes."""
    pad = 16 // torch.empty((), dtype=dtype).element_size()
    return matrix(rows, cols + pad, dtype, seed=seed)[:, :cols]


def problem(n, in_f, out_f, r, dtype, *, num_adapters=None, strided=False, with_weight=True, with_bias=True):
    """Inputs of a decode call. strided: A and B are slices of larger projections (row stride > cols); "aligned":
    slices whose rows are still 16-byte aligned."""
    x = matrix(n, in_f, dtype, seed=1)
    if strided == "aligned":
        A, B = aligned_slice(r, in_f, dtype, seed=2), aligned_slice(out_f, r, dtype, seed=3)
    else:
        A = matrix(r, in_f, dtype, strided, seed=2)
        B = matrix(out_f, r, dtype, strided, seed=3)
    k = num_adapters or 1
    ld = torch.randn(k, r) if num_adapters else torch.randn(r)
    lb = torch.randn(k, out_f) if num_adapters else torch.randn(out_f)
    weight = matrix(out_f, in_f, dtype, seed=4) if with_weight else None
    bias = torch.randn(out_f).to(dtype) if with_weight and with_bias else None
    base = None if with_weight else matrix(n, out_f, dtype, strided, seed=5)
    idx = adapter_idx(n, num_adapters, seed=6) if num_adapters else None
    return dict(x=x, weight=weight, bias=bias, base=base, A=A, B=B, lambda_d=ld, lambda_b=lb, idx=idx)


def reference(p, dtype):
    """(y, u) in float64 (u rounded to dtype, as the kernels store it) and the same in `dtype` with PyTorch."""
    a = p["idx"] if p["idx"] is not None else torch.zeros(p["x"].shape[0], dtype=torch.int64)
    keep = (a >= 0).unsqueeze(1)
    ld, lb = p["lambda_d"].reshape(-1, p["A"].shape[0]), p["lambda_b"].reshape(-1, p["B"].shape[0])
    out = []
    for d in (torch.float64, dtype):
        x, A, B = p["x"].to(d), p["A"].to(d), p["B"].to(d)
        u = (x @ A.T).to(dtype)
        h = u.to(d) * ld[a.clamp(min=0)].to(d)
        before = (
            F.linear(x, p["weight"].to(d), None if p["bias"] is None else p["bias"].to(d))
            if p["weight"] is not None
            else p["base"].to(d)
        )
        y = torch.where(keep, before + lb[a.clamp(min=0)].to(d) * (h @ B.T), before)
        out.append((y, u))
    return out


def assert_within_budget(ours, budgets, ref64, what):
    """ours is within twice the largest error of the budget computations against float64, plus one ulp of the
    result's scale (a rounding flip of u in fp16/bf16)."""
    if ours.numel() == 0:
        return
    err = (ours.double() - ref64).abs().max().item()
    allowed = 2 * max((b.double() - ref64).abs().max().item() for b in budgets)
    floor = torch.finfo(ours.dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= allowed + floor, f"{what}: error {err:.3g} > {allowed:.3g} + {floor:.3g}"


def check(emu, p, dtype):
    y, u = emu.decode(**p)
    assert y.dtype == dtype and u.dtype == dtype
    (y64, u64), (y_torch, u_torch) = reference(p, dtype)
    y_budgets, u_budgets = [y_torch], [u_torch]
    if p["x"].shape[0] <= emu.cpu_decode_max_rows():
        y_cpu, u_cpu = emu.cpu_decode(**p)
        y_budgets.append(y_cpu)
        u_budgets.append(u_cpu)
    assert_within_budget(u, u_budgets, u64.double(), "u")
    assert_within_budget(y, y_budgets, y64, "y")


def size_id(size):
    return "x".join(map(str, size))


# (n, in_f, out_f, r), covering every row bucket (n = 1 | 2..4 | 5..16 | 17..32) on both paths: odd sizes (no
# 16-byte loads: the element-wise instantiation); multiples of 8 (16-byte loads in every dtype) with out_f and r
# not multiples of the rows per warp or block (the last group reads its last row again); 1-sized dims; in_f long
# enough that the 16-byte loop runs several steps per lane (pass 2) and per thread (pass 1: 256 threads x 2 chunks
# per step), with a tail of columns past the last whole chunk (2056 = 257 x 8, 1036 = 4 x 256 + 12). The
# emulation's cost grows with r * n (warp reductions), not with in_f.
SIZES = [
    (1, 1, 1, 1),
    (1, 7, 5, 3),
    (1, 2056, 21, 264),
    (2, 64, 9, 8),
    (3, 64, 40, 16),
    (4, 1036, 7, 9),
    (5, 131, 37, 24),
    (16, 96, 72, 24),
    (11, 2048, 13, 40),
    (17, 64, 33, 8),
    (32, 40, 24, 12),
    (32, 520, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("mode", ["weight+bias", "weight", "base"])
def test_decode(emu, dtype, size, mode):
    p = problem(*size, dtype, with_weight=mode != "base", with_bias=mode == "weight+bias")
    check(emu, p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 64, 40, 16), (4, 64, 40, 16), (12, 33, 20, 9), (32, 48, 16, 12)], ids=size_id)
@pytest.mark.parametrize("strided", [False, True, "aligned"])
def test_decode_mixed_adapters(emu, dtype, size, strided):
    """Rows with their own adapters (adapter_idx, -1 rows without one) out of a table of 7."""
    p = problem(*size, dtype, num_adapters=7, strided=strided)
    check(emu, p, dtype)


def test_decode_mixed_adapters_read_only_the_rows_lambdas(emu):
    """Each row gathers its own adapter's lambda entries, never a scan of the adapter table: a batch over a table
    of 1,000 adapters reads exactly the bytes of the same batch over a table of only the adapters it uses (traced
    footprint of both launches), and the unused rows, poisoned with NaN, do not reach the result."""
    n, in_f, out_f, r, k = 8, 64, 40, 16, 1000
    p = problem(n, in_f, out_f, r, torch.bfloat16, num_adapters=k)
    used = torch.tensor([3, 999, 500, 3, 42, 7, 999, 0])
    p["idx"] = used.clone()
    p["idx"][5] = -1  # a row without adapter reads no lambda at all
    unused = torch.ones(k, dtype=torch.bool)
    unused[used] = False
    p["lambda_d"][unused] = float("nan")
    p["lambda_b"][unused] = float("nan")
    y, _ = emu.decode(**p)
    assert torch.isfinite(y).all()
    check(emu, dict(p, lambda_d=p["lambda_d"].nan_to_num(), lambda_b=p["lambda_b"].nan_to_num()), torch.bfloat16)

    compact = dict(p)
    table = torch.unique(used)
    compact["lambda_d"], compact["lambda_b"] = p["lambda_d"][table], p["lambda_b"][table]
    compact["idx"] = torch.where(p["idx"] < 0, p["idx"], torch.searchsorted(table, p["idx"]))
    assert read_bytes(emu, p) == read_bytes(emu, compact)


def traced_launches(emu, p):
    """The emulator's trace records of one decode call's launches (every block traced)."""
    emu.trace_start(1 << 20)
    try:
        emu.decode(**p)
    finally:
        launches = json.loads(emu.trace_stop())
    assert all(ev["executed_blocks"] == ev["blocks"] for ev in launches)
    return launches


def read_bytes(emu, p):
    """The distinct bytes the decode call's launches read."""
    return sum(ev["unique_read_bytes_private"] + ev["unique_read_bytes_shared"] for ev in traced_launches(emu, p))


def launched_kernels(emu, p):
    """The kernel names (with template arguments) one decode call launches."""
    return [ev["kernel"] for ev in traced_launches(emu, p)]


@pytest.mark.parametrize(
    "n, bucket, slow_bucket",
    [(1, 1, 4), (2, 4, 4), (4, 4, 4), (5, 16, 32), (16, 16, 32), (17, 32, 32), (32, 32, 32)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("mode", ["weight", "base"])
def test_decode_picks_the_bucket_and_the_16_byte_path(emu, n, bucket, slow_bucket, mode):
    """Aligned inputs run the 16-byte instantiations of the row bucket of n (1, 4, 16, 32); unaligned ones the
    element-wise ones, of bucket 4 or 32 (what the report's per-kernel facts rely on). Pass 2 with a base instead
    of W streams only B: B's alignment alone decides it (tested in the next test)."""
    p = problem(n, 64, 40, 16, torch.bfloat16, with_weight=mode == "weight")
    names = launched_kernels(emu, p)
    pattern = r"decode_{}_kernel<(?:__nv_bfloat16|c10::BFloat16|[\w:]+), {}, {}>"
    assert len(names) == 2, names
    assert re.search(pattern.format("u", bucket, "true"), names[0]), names
    assert re.search(pattern.format("y", bucket, "true"), names[1]), names
    p = problem(n, 63, 40, 15, torch.bfloat16, with_weight=mode == "weight")  # rows of A, W and B unaligned
    names = launched_kernels(emu, p)
    assert re.search(pattern.format("u", slow_bucket, "false"), names[0]), names
    assert re.search(pattern.format("y", slow_bucket, "false"), names[1]), names


def test_decode_with_a_base_streams_b_alone(emu):
    """With a base given, pass 2 reads no W and no x: unaligned x and A (odd in_f) still leave it the 16-byte
    path when B's rows are aligned; an unaligned W takes pass 2 to the element-wise path."""
    p = problem(4, 63, 40, 16, torch.bfloat16, with_weight=False)
    names = launched_kernels(emu, p)
    assert "4, false>" in names[0] and "4, true>" in names[1], names
    p = problem(4, 63, 40, 16, torch.bfloat16)
    names = launched_kernels(emu, p)
    assert "4, false>" in names[0] and "4, false>" in names[1], names


def test_decode_unaligned_slices(emu):
    """Projection slices whose rows are not 16-byte aligned take the element-wise path."""
    p = problem(6, 64, 40, 16, torch.float16)
    p["A"] = matrix(16, 65, torch.float16, seed=2)[:, 1:]  # base pointer off by 2 bytes
    check(emu, p, torch.float16)


def test_decode_pass_2_is_a_programmatic_dependent_of_pass_1(emu):
    """Pass 2 is launched as a programmatic dependent (PDL) of pass 1, so its launch and its W stream overlap pass 1
    on the GPU (the cost model counts one launch overhead for the pair): the trace marks it, and only it."""
    launches = traced_launches(emu, problem(4, 64, 40, 16, torch.bfloat16))
    assert [(("decode_u" in ev["kernel"]), ev["programmatic"]) for ev in launches] == [(True, False), (False, True)]


@pytest.mark.parametrize("bad", [7, 1000, -2])
@pytest.mark.parametrize("op", ["decode", "op_vera_linear_forward", "op_vera_forward"])
def test_decode_kernels_refuse_an_out_of_range_adapter_index(emu, op, bad):
    """The decode kernels check adapter_idx on the device (the op reads nothing back on this path): an entry
    outside [-1, num_adapters) fails the launch with the check's message, before any lambda row is gathered."""
    p = problem(4, 64, 40, 16, torch.bfloat16, num_adapters=7)
    p["idx"][2] = bad
    with pytest.raises(RuntimeError, match=r"adapter_idx holds a value outside \[-1, num_adapters\)"):
        if op == "decode":
            emu.decode(**p)
        elif op == "op_vera_linear_forward":
            emu.op_vera_linear_forward(
                p["x"], p["weight"], p["bias"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], p["idx"]
            )
        else:
            base = torch.zeros(p["x"].shape[0], p["B"].shape[0], dtype=p["x"].dtype)
            emu.op_vera_forward(p["x"], base, p["A"], p["B"], p["lambda_d"], p["lambda_b"], p["idx"])


def test_decode_refuses_too_many_rows(emu):
    p = problem(emu.decode_max_rows() + 1, 8, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="invalid argument"):
        emu.decode(**p)


def test_decode_zero_rows_launches_nothing(emu):
    p = problem(1, 64, 40, 16, torch.bfloat16)
    p["x"] = p["x"][:0]
    assert launched_kernels(emu, p) == []
    y, u = emu.decode(**p)
    assert y.shape == (0, 40) and u.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mixed_row_rounds_like_the_gemm_path(emu, dtype):
    """The fused pass rounds h = u * lambda_d to the data dtype as the CUDA build's GEMM path does (N > 32), and keeps
    the rest in fp32 before y's one rounding: a row decoded alone equals the same row in a batch of 64 except where
    the two fp32 summation orders round across a tie (with h kept in fp32 about half the entries differed)."""
    equal = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        i, o, r = 40 + seed, 56 - seed, 8 + 3 * seed
        x, A, B = (torch.randn(*s, generator=g).to(dtype) for s in ((64, i), (r, i), (o, r)))
        ld, lb = torch.randn(3, r, generator=g), torch.randn(3, o, generator=g)
        idx = torch.randint(0, 3, (64,), generator=g)
        zeros = torch.zeros(64, o, dtype=dtype)
        batch, _ = emu.op_vera_forward(x, zeros, A, B, ld, lb, idx)
        alone, _ = emu.op_vera_forward(x[:1], zeros[:1], A, B, ld, lb, idx[:1])
        equal.append((alone[0] == batch[0]).float().mean().item())
    assert sum(equal) / len(equal) >= 0.95, equal
