"""The functional ops against float64 references: forward, gradients, mixed batches, delta weight and merge."""

import pytest
import torch

import vera_ext
from vera_ext import ops

from vera_testing import DEVICES, LOW_PRECISION, assert_low_precision_close, peft_formula, vera_reference

OPS = torch.ops.vera_ext


def make_case(n, i, o, r, device="cpu", dtype=torch.float32, num_adapters=None, seed=0, proj_pad=3):
    """Inputs with A/B as strided slices of a larger shared projection (as layers use them)."""
    g = torch.Generator().manual_seed(seed)
    full_A = torch.randn(r + proj_pad, i + proj_pad, generator=g)
    full_B = torch.randn(o + proj_pad, r + proj_pad, generator=g)
    A = full_A.to(device, dtype)[:r, :i]
    B = full_B.to(device, dtype)[:o, :r]
    x = torch.randn(n, i, generator=g).to(device, dtype)
    base = torch.randn(n, o, generator=g).to(device, dtype)
    shape_d = (r,) if num_adapters is None else (num_adapters, r)
    shape_b = (o,) if num_adapters is None else (num_adapters, o)
    ld = torch.randn(shape_d, generator=g).to(device)
    lb = torch.randn(shape_b, generator=g).to(device)
    return x, base, A, B, ld, lb


# N below and above r (one adapter: the folded path either way), the decode sizes; dims 1, odd, >= 1000, r 1 to 1024.
SHAPES = [(1, 1, 1, 1), (7, 13, 5, 3), (40, 17, 9, 8), (3, 1031, 1003, 16), (1100, 24, 20, 12), (5, 32, 24, 1024)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,i,o,r", SHAPES)
def test_forward_fp32_matches_float64(device, n, i, o, r):
    x, base, A, B, ld, lb = make_case(n, i, o, r, device)
    assert A.stride(0) == i + 3 and B.stride(0) == r + 3  # strided slices of the projection, read in place
    y, u = OPS.vera_forward(x, base, A, B, ld, lb)
    ref = vera_reference(x, base, A, B, ld, lb)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(u.double(), x.double() @ A.double().T, rtol=1e-5, atol=1e-5 * (1 + u.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,i,o,r", SHAPES)
def test_linear_forward_fp32_matches_float64(device, n, i, o, r):
    x, _, A, B, ld, lb = make_case(n, i, o, r, device)
    weight = torch.randn(o, i, device=device)
    bias = torch.randn(o, device=device)
    y, _ = OPS.vera_linear_forward(x, weight, bias, A, B, ld, lb)
    base = x.double() @ weight.double().T + bias.double()
    ref = vera_reference(x, base, A, B, ld, lb)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,i,o,r", SHAPES)
def test_gradients_fp32_match_float64(device, n, i, o, r):
    x, base, A, B, ld, lb = make_case(n, i, o, r, device)
    for t in (x, base, ld, lb):
        t.requires_grad_(True)
    g = torch.randn(n, o, device=device)
    ours = _grads(lambda *a: ops.vera_forward(*a), (x, base, A, B, ld, lb), g)
    ref = _grads(
        lambda x, base, A, B, ld, lb: vera_reference(x, base, A, B, ld, lb),
        (x, base, A, B, ld, lb),
        g.double(),
    )
    for name, a, b in zip(("x", "base_out", "lambda_d", "lambda_b"), ours, ref):
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * max(scale, 1e-30), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_grad", [True, False])
# I=11, O=7, r=4: N=3 is below both merged-weight thresholds (csrc/common/vera_impl.h), N=6 uses W + delta_W in
# backward only, N=40 in forward and backward.
@pytest.mark.parametrize("n", [3, 6, 40])
def test_fused_linear_gradients_include_base(device, weight_grad, n):
    x, _, A, B, ld, lb = make_case(n, 11, 7, 4, device, seed=3)
    weight = torch.randn(7, 11, device=device, requires_grad=weight_grad)
    bias = torch.randn(7, device=device, requires_grad=weight_grad)
    for t in (x, ld, lb):
        t.requires_grad_(True)
    g = torch.randn(n, 7, device=device)
    ours = _grads(lambda *a: ops.vera_linear_forward(*a), (x, weight, bias, A, B, ld, lb), g)

    def ref_fn(x, weight, bias, A, B, ld, lb):
        return vera_reference(x, x.double() @ weight.double().T + bias.double(), A, B, ld, lb)

    ref = _grads(ref_fn, (x, weight, bias, A, B, ld, lb), g.double())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("n", [2, 9])  # N below and above r = 3
def test_gradcheck_float64(mixed, n):
    """float64 data runs in float64 on the CPU (lambdas too), so autograd.gradcheck applies."""
    k = 2 if mixed else None
    x, base, A, B, ld, lb = make_case(n, 6, 4, 3, dtype=torch.float64, num_adapters=k)
    ld, lb = ld.double(), lb.double()
    idx = torch.tensor([1, -1, 0, 1, 0, 0, 1, -1, 1][:n]) if mixed else None
    weight, bias = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, base, ld, lb, weight, bias)]
    x, base, ld, lb, weight, bias = leaves
    assert torch.autograd.gradcheck(
        lambda x, base, ld, lb: ops.vera_forward(x, base, A, B, ld, lb, idx), (x, base, ld, lb)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b, ld, lb: ops.vera_linear_forward(x, w, b, A, B, ld, lb, idx), (x, weight, bias, ld, lb)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_equals_each_row_alone(device):
    n, i, o, r, k = 9, 10, 7, 5, 3
    x, base, A, B, ld, lb = make_case(n, i, o, r, device, num_adapters=k, seed=7)
    idx = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2], device=device)
    y, _ = OPS.vera_forward(x, base, A, B, ld, lb, idx)
    for row in range(n):
        a = idx[row].item()
        if a < 0:
            expected = base[row : row + 1]
        else:
            expected, _ = OPS.vera_forward(x[row : row + 1], base[row : row + 1], A, B, ld[a], lb[a])
        torch.testing.assert_close(y[row : row + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_gradients_match_float64(device):
    n, i, o, r, k = 12, 8, 6, 4, 3
    x, base, A, B, ld, lb = make_case(n, i, o, r, device, num_adapters=k, seed=11)
    idx = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2, 0, 0, 1], device=device)
    for t in (x, base, ld, lb):
        t.requires_grad_(True)
    g = torch.randn(n, o, device=device)
    ours = torch.autograd.grad(ops.vera_forward(x, base, A, B, ld, lb, idx), [x, base, ld, lb], g)

    mask = (idx >= 0).double().unsqueeze(1)
    safe = idx.clamp(min=0)
    d = torch.float64
    ref = base.to(d) + mask * lb.to(d)[safe] * (((x.to(d) @ A.to(d).T) * ld.to(d)[safe]) @ B.to(d).T)
    expected = torch.autograd.grad(ref, [x, base, ld, lb], g.double())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n", [3, 300])  # decode-sized and GEMM-sized N
def test_low_precision_within_twice_pytorch_error(device, dtype, n):
    i, o, r = 96, 80, 64
    x, base, A, B, ld, lb = make_case(n, i, o, r, device, dtype=dtype, seed=5)
    x.requires_grad_(True)
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    g = torch.randn(n, o, device=device).to(dtype)

    y = ops.vera_forward(x, base, A, B, ld, lb)
    ours_grads = torch.autograd.grad(y, [x, ld, lb], g)
    same = peft_formula(x, base, A, B, ld, lb, dtype)
    same_grads = torch.autograd.grad(same, [x, ld, lb], g)
    ref = vera_reference(x, base, A, B, ld, lb)
    ref_grads = torch.autograd.grad(ref, [x, ld, lb], g.double())

    assert_low_precision_close(y.detach(), same.detach(), ref.detach(), what="forward")
    for name, a, b, c in zip(("x", "lambda_d", "lambda_b"), ours_grads, same_grads, ref_grads):
        assert_low_precision_close(a, b, c, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_decode_odd_dims_every_dtype(dtype, n):
    """The CPU decode path (N <= 16) reads rows in vectors of 8 (fp64: 4) and four rows at a time: odd feature counts
    leave a tail in every row and odd output counts a tail of rows, in each dtype's loads."""
    i, o, r = 1031, 37, 13
    x, base, A, B, ld, lb = make_case(n, i, o, r, dtype=dtype, seed=n)
    if dtype == torch.float64:
        ld, lb = ld.double(), lb.double()
    weight, bias = torch.randn(o, i).to(dtype), torch.randn(o).to(dtype)
    linear = torch.nn.functional.linear(x, weight, bias)
    linear64 = x.double() @ weight.double().T + bias.double()
    for what, y, base_out, base64 in (
        ("fused", OPS.vera_linear_forward(x, weight, bias, A, B, ld, lb)[0], linear, linear64),
        ("base_out", OPS.vera_forward(x, base, A, B, ld, lb)[0], base, base.double()),
    ):
        ref = vera_reference(x, base64, A, B, ld, lb)
        if dtype == torch.float64:
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item(), msg=what)
        else:
            same_dtype = peft_formula(x, base_out, A, B, ld, lb, dtype)
            assert_low_precision_close(y, same_dtype, ref, what=f"{what}, {dtype}, n={n}")


@pytest.mark.parametrize("device", DEVICES)
def test_results_are_deterministic(device):
    x, base, A, B, ld, lb = make_case(513, 40, 30, 16, device, num_adapters=4, seed=2)
    idx = torch.randint(-1, 4, (513,), device=device)
    g = torch.randn(513, 30, device=device)
    u = x @ A.T
    first = OPS.vera_backward(g, u, A, B, ld, lb, idx, None, [True, True, True])
    for _ in range(3):
        again = OPS.vera_backward(g, u, A, B, ld, lb, idx, None, [True, True, True])
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _decode_cases():
    """Decode-sized (N <= 16) calls with enough rows that the CPU splits each pass into many chunks: fused and
    base_out forms, a mixed batch with a row outside all adapters, fp32 and bf16."""
    cases = []
    for n, dtype in ((1, torch.float32), (5, torch.bfloat16), (16, torch.float32)):
        x, base, A, B, ld, lb = make_case(n, 700, 600, 96, dtype=dtype, num_adapters=3, seed=n)
        weight = torch.randn(600, 700).to(dtype)
        bias = torch.randn(600).to(dtype)
        idx = torch.arange(n) % 4 - 1  # -1 first: no adapter
        cases.append((OPS.vera_linear_forward, (x, weight, bias, A, B, ld, lb, idx)))
        cases.append((OPS.vera_forward, (x, base, A, B, ld, lb, idx)))
    return cases


def _run_cases(cases):
    with torch.inference_mode():
        return [op(*args) for op, args in cases]


def test_decode_is_bitwise_independent_of_threads():
    """The decode path splits its rows over whichever threads are free; every output is still computed by one
    thread in one order, so results equal the single-threaded ones bit for bit, also with calls from several
    Python threads at once (which share one helper pool)."""
    import threading

    cases = _decode_cases()
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _run_cases(cases)
        torch.set_num_threads(2)
        runs = [_run_cases(cases) for _ in range(5)]
        outs, errors = [], []

        def worker():
            try:
                for _ in range(5):
                    outs.append(_run_cases(cases))
            except BaseException as err:  # reported below instead of lost in the thread
                errors.append(err)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
    finally:
        torch.set_num_threads(old_threads)

    assert len(outs) == 20
    for run in runs + outs:
        for (y, u), (y1, u1) in zip(run, serial):
            assert torch.equal(y, y1) and torch.equal(u, u1)
    # ... and the single-threaded result is the VeRA forward (float64 reference; per-row lambdas, 0 for idx -1).
    (y, _), (_, (x, weight, bias, A, B, ld, lb, idx)) = serial[4], cases[4]
    keep = (idx >= 0)[:, None]
    base = x.double() @ weight.double().T + bias.double()
    ref = vera_reference(x, base, A, B, ld[idx.clamp(min=0)] * keep, lb[idx.clamp(min=0)] * keep)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, base, A, B, ld, lb = make_case(0, 8, 6, 4, device)
    for t in (x, ld, lb):
        t.requires_grad_(True)
    y = ops.vera_forward(x, base, A, B, ld, lb)
    assert y.shape == (0, 6)
    gx, gd, gb = torch.autograd.grad(y, [x, ld, lb], torch.empty(0, 6, device=device))
    assert gx.shape == (0, 8) and torch.equal(gd, torch.zeros_like(gd)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_delta_weight_and_merge_match_float64(device, fan_in_fan_out):
    _, _, A, B, ld, lb = make_case(1, 37, 29, 6, device, seed=9)
    ref = (lb.double()[:, None] * B.double()) @ (ld.double()[:, None] * A.double())
    if fan_in_fan_out:
        ref = ref.T
    delta = ops.vera_delta_weight(A, B, ld, lb, fan_in_fan_out, torch.float32)
    torch.testing.assert_close(delta.double(), ref, rtol=1e-5, atol=1e-6)

    weight = torch.randn(ref.shape, device=device)
    original = weight.clone()
    ops.vera_merge_(weight, A, B, ld, lb, 1.0, fan_in_fan_out)
    torch.testing.assert_close(weight.double(), original.double() + ref, rtol=1e-5, atol=1e-6)
    ops.vera_merge_(weight, A, B, ld, lb, -1.0, fan_in_fan_out)
    torch.testing.assert_close(weight, original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_merge_rounds_once(device, dtype):
    """Low-precision merge = round(float32(W) + delta_fp32): one rounding, as PEFT's fp32 delta does in place."""
    _, _, A, B, ld, lb = make_case(1, 33, 21, 5, device, seed=4)
    weight = torch.randn(21, 33, device=device).to(dtype)
    expected = (weight.float() + ops.vera_delta_weight(A, B, ld, lb, False, torch.float32)).to(dtype)
    ops.vera_merge_(weight, A, B, ld, lb)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_safe_merge_refuses_non_finite_and_keeps_weight(device):
    _, _, A, B, ld, lb = make_case(1, 9, 7, 3, device, seed=1)
    lb[2] = float("inf")
    weight = torch.randn(7, 9, device=device)
    before = weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        ops.vera_merge_(weight, A, B, ld, lb, safe=True)
    assert torch.equal(weight, before)


def test_build_info_reports_cuda_part():
    info = vera_ext.build_info()
    assert set(info) >= {"with_cuda", "cuda_runtime_version", "debug"}
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("vera_ext::vera_merge_", "CUDA")
    assert has_cuda_kernel == info["with_cuda"]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_delta_weight_gradients_match_float64(fan_in_fan_out):
    _, _, A, B, ld, lb = make_case(1, 9, 7, 4, seed=12)
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    delta = ops.vera_delta_weight(A, B, ld, lb, fan_in_fan_out, torch.float32)
    G = torch.randn_like(delta)
    ours = torch.autograd.grad(delta, [ld, lb], G)
    ref = (lb.double()[:, None] * B.double()) @ (ld.double()[:, None] * A.double())
    expected = torch.autograd.grad(ref.T if fan_in_fan_out else ref, [ld, lb], G.double())
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
