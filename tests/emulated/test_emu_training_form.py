"""The training-form ops (docs/DESIGN.md §2.7) as the CUDA build runs them (common/vera_impl.h over the emulated
kernels, GEMMs on the CPU) against the CPU build's ops: vera_apply, vera_linear_apply in every merged mode, and
vera_apply_backward with and without add_delta, N below and above r, with and without adapter_idx."""

import pytest
import torch

from vera_ext import ops  # noqa: F401  (registers torch.ops.vera_ext)

pytestmark = pytest.mark.emulated

CPU = torch.ops.vera_ext


def case(rows, mixed, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_f, out_f, r, k = 24, 20, 8, 3

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    x, weight, bias = rand(rows, in_f), rand(out_f, in_f) / 5, rand(out_f)
    A, B = rand(r, in_f), rand(out_f, r)
    idx = torch.randint(-1, k, (rows,), generator=g) if mixed else None
    shape_d, shape_b = ((k, r), (k, out_f)) if mixed else ((r,), (out_f,))
    ld, lb = rand(*shape_d, dt=torch.float32), rand(*shape_b, dt=torch.float32)
    return x, weight, bias, A, B, ld, lb, idx


def tolerance(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows, mixed", [(40, False), (5, False), (40, True)])  # N above r, N below r, mixed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_form_ops_equal_the_cpu_ops(emu, rows, mixed, dtype):
    x, weight, bias, A, B, ld, lb, idx = case(rows, mixed, dtype)
    u = CPU.vera_project(x, A)
    base = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(
        emu.op_vera_apply(u, base, A, B, ld, lb, idx), CPU.vera_apply(u, base, A, B, ld, lb, idx), **tolerance(dtype)
    )
    merged_modes = ("none", "forward", "both", "kept") if dtype == torch.float32 and not mixed else ("none",)
    for merged in merged_modes:
        got = emu.op_vera_linear_apply(x, u, weight, bias, A, B, ld, lb, idx, merged)
        want = CPU.vera_linear_apply(x, u, weight, bias, A, B, ld, lb, idx, merged)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance(dtype), msg=merged)
    g = torch.randn(rows, weight.shape[0], generator=torch.Generator().manual_seed(5)).to(dtype)
    masks = [([True, True, True, True], False), ([False, True, False, True], False)]
    if dtype == torch.float32 and not mixed:
        masks.append(([True, False, True, True], True))
    for mask, add_delta in masks:
        got = emu.op_vera_apply_backward(g, u, A, B, ld, lb, idx, weight, add_delta, mask)
        want = CPU.vera_apply_backward(g, u, A, B, ld, lb, idx, weight, add_delta, mask)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance(dtype), msg=str(mask))
