"""The fused small-N forward (csrc/cuda/decode_kernels.cu: decode_u_kernel, decode_y_kernel), emulated, against
float64, within twice the error of the same computation by PyTorch in the same dtype or by the CPU decode
primitive (where N is within its limit)."""

import pytest
import torch
import torch.nn.functional as F

from emu_helpers import DTYPES, adapter_idx, matrix

pytestmark = pytest.mark.emulated


def problem(n, in_f, out_f, r, dtype, *, num_adapters=None, strided=False, with_weight=True, with_bias=True):
    """Inputs of a decode call. strided: A and B are slices of larger projections (row stride > cols)."""
    x = matrix(n, in_f, dtype, seed=1)
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


# (n, in_f, out_f, r): one row; odd sizes (no 16-byte loads); multiples of 8 (16-byte loads in every dtype); n
# above the CPU decode limit, up to the CUDA one (32); in_f and r long enough that every thread of pass 1 and
# every lane of pass 2 loads several 16-byte chunks. The emulation's cost grows with r * n (warp reductions),
# not with in_f.
SIZES = [
    (1, 1, 1, 1),
    (1, 7, 5, 3),
    (3, 64, 40, 16),
    (5, 131, 37, 24),
    (16, 96, 72, 24),
    (17, 64, 33, 8),
    (32, 40, 24, 12),
    (1, 2056, 20, 264),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("mode", ["weight+bias", "weight", "base"])
def test_decode(emu, dtype, size, mode):
    p = problem(*size, dtype, with_weight=mode != "base", with_bias=mode == "weight+bias")
    check(emu, p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(4, 64, 40, 16), (12, 33, 20, 9), (32, 48, 16, 12)], ids=size_id)
@pytest.mark.parametrize("strided", [False, True])
def test_decode_mixed_adapters(emu, dtype, size, strided):
    p = problem(*size, dtype, num_adapters=3, strided=strided)
    check(emu, p, dtype)


def test_decode_unaligned_slices(emu):
    """Projection slices whose rows are not 16-byte aligned take the element-wise path."""
    p = problem(6, 64, 40, 16, torch.float16)
    p["A"] = matrix(16, 65, torch.float16, seed=2)[:, 1:]  # base pointer off by 2 bytes
    check(emu, p, torch.float16)


def test_decode_refuses_too_many_rows(emu):
    p = problem(emu.decode_max_rows() + 1, 8, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="invalid argument"):
        emu.decode(**p)
