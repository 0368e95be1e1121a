"""Autocast: the ops and VeraLinear compute in the autocast dtype as nn.Linear does, lambdas stay fp32.

References: nn.Linear under the same autocast (dtype, and the error budget: ours may be at most ~2x the error of
the whole computation done by PyTorch in the autocast dtype) and float64 evaluations of the VeRA formula.
"""

import pytest
import torch
from torch import nn

import vera_ext
from vera_ext import ops
from vera_models import ScaledLinear, mlp, ours, randomize_lambdas
from vera_testing import assert_low_precision_close, vera_reference
from test_ops import make_case

# (device, autocast dtype): CPU autocast bf16 and fp16, CUDA fp16/bf16 where a GPU is visible.
CASES = [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),
]


def layer_with_lambdas(device, base=None, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 20) if base is None else base
    layer = vera_ext.VeraLinear(base, r=8, init_weights=False).to(device)
    layer.add_adapter("other", 6, init_weights=False)
    return layer.to(device)


def reference64(layer, x, name="default"):
    """base(x) + VeRA term, all in float64, from the layer's own tensors."""
    r = layer.r[name]
    A = layer.vera_projection.vera_A[:r, : layer.in_features]
    B = layer.vera_projection.vera_B[: layer.out_features, :r]
    base = layer.base_layer
    base_out = x.double() @ base.weight.double().T
    if isinstance(base, nn.Linear):
        base_out = base_out + base.bias.double()
    else:
        base_out = base_out * base.scale.double()
    return vera_reference(x, base_out, A, B, layer.vera_lambda_d[name], layer.vera_lambda_b[name])


def pytorch_in(layer, x, dtype, name="default"):
    """The same computation done by PyTorch alone: the base under autocast, the adapter term in `dtype`."""
    r = layer.r[name]
    A = layer.vera_projection.vera_A[:r, : layer.in_features].to(dtype)
    B = layer.vera_projection.vera_B[: layer.out_features, :r].to(dtype)
    with torch.autocast(x.device.type, dtype=dtype):
        base_out = layer.base_layer(x)
    lb, ld = layer.vera_lambda_b[name].to(dtype), layer.vera_lambda_d[name].to(dtype)
    return base_out.to(dtype) + lb * (((x.to(dtype) @ A.T) * ld) @ B.T)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, "autocast"])
def test_layer_follows_autocast_like_linear(device, dtype, x_dtype):
    layer = layer_with_lambdas(device)
    x = torch.randn(2, 5, 24, device=device, dtype=dtype if x_dtype == "autocast" else x_dtype)
    with torch.autocast(device, dtype=dtype):
        expected_dtype = layer.base_layer(x).dtype
        y = layer(x)
    assert expected_dtype == dtype and y.dtype == expected_dtype
    assert_low_precision_close(y, pytorch_in(layer, x, dtype), reference64(layer, x), what="VeraLinear autocast")
    # the projection slices were cast once and cached, not on every forward
    assert any(t.dtype == dtype for t in layer.vera_projection.cached_tensors())


@pytest.mark.parametrize("device,dtype", CASES)
def test_gradients_under_autocast(device, dtype):
    layer = layer_with_lambdas(device)
    x = torch.randn(6, 24, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
    g = torch.randn(y.shape, device=device, generator=None)
    ld, lb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    gx, gld, glb = torch.autograd.grad(y, [x, ld, lb], g.to(y.dtype))
    assert ld.dtype == lb.dtype == gld.dtype == glb.dtype == torch.float32 and gx.dtype == torch.float32

    x64 = x.detach().double().requires_grad_()
    ld64, lb64 = ld.detach().double().requires_grad_(), lb.detach().double().requires_grad_()
    A = layer.vera_projection.vera_A[:8, :24].double()
    B = layer.vera_projection.vera_B[:20, :8].double()
    w = layer.base_layer.weight.double()
    ref = torch.autograd.grad(vera_reference(x64, x64 @ w.T, A, B, ld64, lb64), [x64, ld64, lb64], g.double())
    # the inputs were rounded to `dtype` before the GEMMs: a relative tolerance of a few of its ulps
    tol = 8 * torch.finfo(dtype).eps
    for ours_g, ref_g in zip((gx, gld, glb), ref):
        torch.testing.assert_close(ours_g.double(), ref_g, rtol=tol, atol=tol * ref_g.abs().max().item())


@pytest.mark.parametrize("device,dtype", CASES)
def test_ops_cast_everything_but_lambdas(device, dtype):
    x, base, A, B, ld, lb = make_case(5, 12, 10, 8, device)
    weight, bias = torch.randn(10, 12, device=device), torch.randn(10, device=device)
    idx = torch.tensor([0, -1, 1, 1, 0], device=device)
    ld2, lb2 = torch.stack([ld, -ld]), torch.stack([lb, 2 * lb])
    with torch.autocast(device, dtype=dtype):
        linear_dtype = nn.functional.linear(x, weight, bias).dtype
        y1 = ops.vera_forward(x, base, A, B, ld, lb)  # lambdas fp32 are accepted: they were not cast
        y2 = ops.vera_linear_forward(x, weight, bias, A, B, ld, lb)
        y3 = ops.vera_linear_forward(x, weight, None, A, B, ld2, lb2, idx)
        # fp64 is not autocast-eligible: left as it is, like F.linear leaves it
        y64 = ops.vera_forward(x.double(), base.double(), A.double(), B.double(), ld.double(), lb.double())
    assert y1.dtype == y2.dtype == y3.dtype == linear_dtype == dtype and y64.dtype == torch.float64
    ref = vera_reference(x, base, A, B, ld, lb)
    same = vera_reference(x.to(dtype), base.to(dtype), A.to(dtype), B.to(dtype), ld, lb)  # inputs rounded
    assert_low_precision_close(y1, same.to(dtype), ref, what="vera_forward")
    torch.testing.assert_close(y64, ref)


def test_non_linear_base_and_mixed_batch_under_autocast():
    # A base that is not nn.Linear: the adapter op is a GEMM, so under autocast its result is in the autocast
    # dtype even where the base's own output is not (as addmm's is, with an fp32 bias).
    layer = layer_with_lambdas("cpu", base=ScaledLinear(24, 20))
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        mixed = layer(x, adapter_names=["default", "__base__", "other", "default"])
    assert y.dtype == mixed.dtype == torch.bfloat16
    ref = reference64(layer, x)
    assert_low_precision_close(y, pytorch_in(layer, x, torch.bfloat16), ref, what="non-Linear base")
    assert_low_precision_close(mixed[0], pytorch_in(layer, x[:1], torch.bfloat16)[0], ref[0], what="mixed row")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        assert layer(x).dtype == torch.float32  # autocast switched off inside: fp32 again


def test_model_under_autocast_matches_base_model_dtype_and_compiles():
    model = ours(mlp(), r=8, target_modules=["lin0", "lin1", "lin2"])
    randomize_lambdas(model)
    # (more rows than the one-pass forward takes: eager then runs the training form a compiled graph always runs)
    x = torch.randn(20, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with model.disable_adapter():
            base_dtype = model(x).dtype
        eager = model(x)
    assert base_dtype == eager.dtype == torch.bfloat16

    def step(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inp)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)
    lambdas = [p for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(compiled.float().sum(), lambdas)
    assert all(g.dtype == torch.float32 for g in grads)
