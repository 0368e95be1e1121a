"""torch.library.opcheck on every vera_ext op: schema, fake kernels, autograd registration, AOT dispatch."""

import pytest
import torch

from vera_testing import DEVICES
from test_ops import make_case

OPS = torch.ops.vera_ext


def forward_cases(device):
    for n, mixed, dtype in [(6, False, torch.float32), (40, False, torch.float32), (7, True, torch.float32),
                            (5, False, torch.bfloat16), (0, False, torch.float32)]:
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
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_opcheck_delta_and_merge(device, fan_in_fan_out):
    _, _, A, B, ld, lb = make_case(1, 12, 10, 8, device)
    torch.library.opcheck(OPS.vera_delta_weight, (A, B, ld, lb, fan_in_fan_out, torch.bfloat16))
    shape = (12, 10) if fan_in_fan_out else (10, 12)
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(shape, device=device, dtype=dtype)
        torch.library.opcheck(OPS.vera_merge_, (weight, A, B, ld, lb, 0.5, fan_in_fan_out, True))
