"""torch.library.opcheck on every vera_ext op: schema, fake kernels, autograd registration, AOT dispatch."""

import pytest
import torch

from vera_testing import DEVICES
from test_ops import make_case

OPS = torch.ops.vera_ext


def forward_cases(device):
    for n, mixed, dtype in [
        (6, False, torch.float32),
        (40, False, torch.float32),
        (7, True, torch.float32),
        (5, False, torch.bfloat16),
        (0, False, torch.float32),
    ]:
        k = 3 if mixed else None
        x, base, A, B, ld, lb = make_case(n, 12, 10, 8, device, dtype=dtype, num_adapters=k)
        idx = torch.tensor([0, 2, -1, 1, 1, 0, 2][:n], device=device) if mixed else None
        yield x, base, A, B, ld, lb, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_ops(device, requires_grad):
    for x, base, A, B, ld, lb, idx in forward_cases(device):
        for t in (x, base, ld, lb):
            t.requires_grad_(requires_grad)
        torch.library.opcheck(OPS.vera_forward, (x, base, A, B, ld, lb, idx))
        weight = torch.randn(10, 12, device=device, dtype=x.dtype)
        bias = torch.randn(10, device=device, dtype=x.dtype)
        torch.library.opcheck(OPS.vera_linear_forward, (x, weight, bias, A, B, ld, lb, idx))
        torch.library.opcheck(OPS.vera_linear_forward, (x, weight, None, A, B, ld, lb, idx))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    for x, base, A, B, ld, lb, idx in forward_cases(device):
        g = torch.randn_like(base)
        u = x @ A.T
        weight = torch.randn(10, 12, device=device, dtype=x.dtype)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            torch.library.opcheck(OPS.vera_backward, (g, u, A, B, ld, lb, idx, None, mask))
        torch.library.opcheck(OPS.vera_backward, (g, u, A, B, ld, lb, idx, weight, [True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_training_form_ops(device, requires_grad):
    """vera_project, vera_apply, vera_linear_apply (every merged mode where it is allowed) and their backward."""
    for x, base, A, B, ld, lb, idx in forward_cases(device):
        for t in (x, base, ld, lb):
            t.requires_grad_(requires_grad)
        torch.library.opcheck(OPS.vera_project, (x, A))
        u = (x @ A.T).detach().requires_grad_(requires_grad)
        torch.library.opcheck(OPS.vera_apply, (u, base, A, B, ld, lb, idx))
        weight = torch.randn(10, 12, device=device, dtype=x.dtype)
        bias = torch.randn(10, device=device, dtype=x.dtype)
        one_fp32 = idx is None and x.dtype == torch.float32
        for merged in ("none", "forward", "backward", "both", "kept") if one_fp32 else ("none",):
            torch.library.opcheck(OPS.vera_linear_apply, (x, u, weight, bias, A, B, ld, lb, idx, merged))
        g = torch.randn_like(base)
        for mask in ([True, True, True, True], [False, True, False, True], [True, False, True, False]):
            torch.library.opcheck(OPS.vera_apply_backward, (g, u.detach(), A, B, ld, lb, idx, weight, False, mask))
        if one_fp32:
            mask = [True, False, True, True]
            torch.library.opcheck(OPS.vera_apply_backward, (g, u.detach(), A, B, ld, lb, idx, weight, True, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_opcheck_delta_and_merge(device, fan_in_fan_out):
    _, _, A, B, ld, lb = make_case(1, 12, 10, 8, device)
    torch.library.opcheck(OPS.vera_delta_weight, (A, B, ld, lb, fan_in_fan_out, torch.bfloat16))
    shape = (12, 10) if fan_in_fan_out else (10, 12)
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(shape, device=device, dtype=dtype)
        torch.library.opcheck(OPS.vera_merge_, (weight, A, B, ld, lb, 0.5, fan_in_fan_out, True))


# ------------------------------------------------------------------------------------ realistic, wider cases


def realistic_cases(device):
    """Every dtype the kernels take, A/B as strided slices of the shared projection, a strided x (a column slice of
    a wider tensor, as a model's activations can be), mixed batches with '-1' rows, an all-base batch, one row."""
    mixed = [0, -1, 1, 1, -1, 0, 2, 2, 0]
    cases = [
        (torch.float32, mixed),
        (torch.float32, [-1] * 4),
        (torch.float32, None),
        (torch.float16, mixed),
        (torch.bfloat16, [2]),
        (torch.float64, None),
    ]
    for dtype, idx in cases:
        n = 6 if idx is None else len(idx)
        k = None if idx is None else 3
        x, base, A, B, ld, lb = make_case(n, 12, 10, 8, device, dtype=dtype, num_adapters=k, seed=n)
        if dtype == torch.float64:  # fp64 data takes fp64 lambdas
            ld, lb = ld.double(), lb.double()
        x_strided = torch.randn(n, 20, device=device, dtype=dtype)[:, 3:15]
        assert A.stride(0) != A.shape[1] and B.stride(0) != B.shape[1] and x_strided.stride(0) == 20
        adapter_idx = None if idx is None else torch.tensor(idx, device=device)
        yield x, x_strided, base, A, B, ld, lb, adapter_idx


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_realistic_forward_cases(device):
    for x, x_strided, base, A, B, ld, lb, idx in realistic_cases(device):
        weight = torch.randn(10, 16, device=device, dtype=x.dtype)[:, 2:14]  # a strided weight view
        bias = torch.randn(10, device=device, dtype=x.dtype)
        base_strided = torch.randn(base.shape[0], 14, device=device, dtype=x.dtype)[:, 1:11]
        for inp, base_out in ((x, base), (x_strided, base_strided)):
            xi, bi, ldi, lbi = [t.detach().requires_grad_() for t in (inp, base_out, ld, lb)]
            torch.library.opcheck(OPS.vera_forward, (xi, bi, A, B, ldi, lbi, idx))
            torch.library.opcheck(
                OPS.vera_linear_forward, (xi, weight, bias if inp is x else None, A, B, ldi, lbi, idx)
            )
        if x.dtype == torch.float32:
            # the base weight itself trained (bias="all"-style training): its gradient goes through the op too
            w = weight.detach().clone().requires_grad_()
            torch.library.opcheck(OPS.vera_linear_forward, (x, w, bias.clone().requires_grad_(), A, B, ld, lb, idx))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_every_output_mask(device):
    masks = [[a, b, c] for a in (False, True) for b in (False, True) for c in (False, True)]
    for x, _, base, A, B, ld, lb, idx in realistic_cases(device):
        g = torch.randn_like(base)
        u = (x.to(ld.dtype) @ A.to(ld.dtype).T).to(x.dtype)
        weight = torch.randn(10, 12, device=device, dtype=x.dtype)
        for w in (None, weight):
            # every mask against the fake kernel (what each mask changes is which outputs are empty) ...
            for mask in masks:
                torch.library.opcheck(
                    OPS.vera_backward, (g, u, A, B, ld, lb, idx, w, mask), test_utils=("test_schema", "test_faketensor")
                )
            # ... and the full check, AOT dispatch included, on two of them (it costs ~10x more)
            for mask in ([True, False, True], [False, True, True]):
                torch.library.opcheck(OPS.vera_backward, (g, u, A, B, ld, lb, idx, w, mask))
