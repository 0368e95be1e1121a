"""VeraLinear's fast path for the common call (one active adapter on a plain nn.Linear, see
``VeraLinear._forward_single_fused``): it is taken where it should be, gives bit-identical outputs and gradients to
the general path, and steps aside in every case the general path handles differently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vera_ext import VeraLinear, VeraProjection
from vera_ext.autocast import autocast_dtype
from vera_ext.config import VeraConfig

from vera_models import mlp, ours
from vera_testing import DEVICES, vera_reference

I, O, R = 24, 20, 8


def make_layer(dtype=torch.float32, device="cpu", **kwargs) -> VeraLinear:
    projection = VeraProjection.from_key(R, I, O).to(device, dtype)
    base = nn.Linear(I, O, dtype=dtype, device=device)
    return VeraLinear(base, R, projection=projection, init_weights=False, **kwargs)


def general_path(layer: VeraLinear, monkeypatch) -> None:
    """Make ``layer`` skip the fast path, so it runs the general forward."""
    monkeypatch.setattr(layer, "_forward_single_fused", lambda x: None)


def run(layer, x):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    lam = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    grads = [x.grad] + [p.grad.clone() for p in lam]
    for p in lam:
        p.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(I,), (1, I), (5, I), (2, 3, I), (0, I), (40, I)])
def test_fast_path_equals_general_path(device, dtype, shape, monkeypatch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA ops take fp32, fp16 and bf16")
    layer = make_layer(dtype, device)
    x = torch.randn(shape, dtype=dtype, device=device)
    assert layer._forward_single_fused(x) is not None  # the common call takes the fast path
    y_fast, g_fast = run(layer, x)
    general_path(layer, monkeypatch)
    y_general, g_general = run(layer, x)
    assert y_fast.dtype == dtype and y_fast.shape == (*shape[:-1], O)
    assert torch.equal(y_fast, y_general)
    for a, b in zip(g_fast, g_general):
        assert torch.equal(a, b)


def test_fast_path_result_against_float64():
    layer = make_layer().eval()
    x = torch.randn(3, I)
    with torch.inference_mode():
        y = layer(x)
    A, B = layer.vera_projection.vera_A[:R, :I], layer.vera_projection.vera_B[:O, :R]
    ref = vera_reference(
        x,
        layer.base_layer(x).detach(),
        A,
        B,
        layer.vera_lambda_d["default"].detach(),
        layer.vera_lambda_b["default"].detach(),
    )
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def _two_active(layer):
    layer.update_layer("other", R, init_weights=False)
    layer.set_adapter(["default", "other"])


def _merged(layer):
    layer.merge()


def _disabled(layer):
    layer.enable_adapters(False)


def _forward_hook(layer):
    layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)


def _pre_hook(layer):
    layer.base_layer.register_forward_pre_hook(lambda m, i: (i[0] * 2,))


def _dropout_training(layer):
    layer.update_layer("drop", R, vera_dropout=0.5, init_weights=False)
    layer.set_adapter("drop")
    layer.train()


# Each case the fast path must leave to the general path, with what makes it different there.
DECLINES = {
    "two active adapters (summed)": _two_active,
    "merged adapter (base layer alone)": _merged,
    "adapters disabled": _disabled,
    "forward hook on the base layer": _forward_hook,
    "forward pre-hook on the base layer": _pre_hook,
    "active dropout in training": _dropout_training,
}


@pytest.mark.parametrize("case", list(DECLINES))
def test_fast_path_steps_aside(case, monkeypatch):
    layer = make_layer()
    DECLINES[case](layer)
    x = torch.randn(4, I)
    assert layer._forward_single_fused(x) is None
    torch.manual_seed(1)
    y = layer(x)
    general_path(layer, monkeypatch)
    torch.manual_seed(1)
    assert torch.equal(y, layer(x))


def test_fast_path_taken_with_dropout_in_eval():
    layer = make_layer(vera_dropout=0.5).eval()
    x = torch.randn(4, I)
    assert layer._forward_single_fused(x) is not None
    layer.train()
    assert layer._forward_single_fused(x) is None


def test_fast_path_steps_aside_for_a_linear_subclass_and_fan_in_fan_out():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    layer = VeraLinear(ScaledLinear(I, O), R, init_weights=False)
    x = torch.randn(2, I)
    assert layer._forward_single_fused(x) is None
    base_out = layer.base_layer(x)
    A, B = layer.vera_projection.vera_A[:R, :I], layer.vera_projection.vera_B[:O, :R]
    ref = vera_reference(
        x, base_out.detach(), A, B, layer.vera_lambda_d["default"].detach(), layer.vera_lambda_b["default"].detach()
    )
    torch.testing.assert_close(layer(x).detach().double(), ref, rtol=1e-5, atol=1e-5)

    conv = VeraLinear(nn.Linear(I, O), R, fan_in_fan_out=True)
    assert conv._forward_single_fused(x) is None


def test_fast_path_steps_aside_for_other_dtypes_and_autocast():
    layer = make_layer()
    x16 = torch.randn(2, I, dtype=torch.bfloat16)
    assert layer._forward_single_fused(x16) is None  # x not in the weight's dtype: the general path decides
    x = torch.randn(2, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._forward_single_fused(x) is None
        y = layer(x)
        assert y.dtype == autocast_dtype(x) == torch.bfloat16


def _record_fast_path(layer: VeraLinear) -> list:
    """Replace the layer's fast path with a wrapper that records what it returned."""
    seen = []
    fast = layer._forward_single_fused
    layer._forward_single_fused = lambda t: seen.append(fast(t)) or seen[-1]
    return seen


def test_fast_path_steps_aside_for_extra_arguments_and_mixed_batches():
    layer = make_layer()
    layer.update_layer("other", R, init_weights=False)
    seen = _record_fast_path(layer)
    layer(torch.randn(2, I), adapter_names=["default", "other"])
    assert seen == []  # adapter_names never reach the fast path

    vm = ours(mlp(), r=6, target_modules=["lin0"], init_weights=False)
    vm.add_adapter("b", VeraConfig(r=6, target_modules=["lin0"], init_weights=False))
    (target,) = [m for m in vm.modules() if isinstance(m, VeraLinear)]
    seen = _record_fast_path(target)
    x = torch.randn(2, 10)
    mixed = vm(x, adapter_names=["default", "b"])
    assert seen == [None]  # a model-level mixed batch is in progress: the rows use different adapters
    vm.set_adapter("b")
    torch.testing.assert_close(mixed[1:], vm(x[1:]))
    assert seen[-1] is not None  # and outside one, the fast path serves the active adapter


def test_fast_path_follows_replaced_lambdas_and_projection_updates():
    layer = make_layer().eval()
    x = torch.randn(3, I)
    with torch.no_grad():
        before = layer(x)
        layer.vera_lambda_b["default"].mul_(2)
        after_lambda = layer(x)
        layer.vera_projection.vera_B.mul_(-1)
        after_projection = layer(x)
        base = layer.base_layer(x)
    torch.testing.assert_close(after_lambda - base, 2 * (before - base), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after_projection - base, -(after_lambda - base), rtol=1e-5, atol=1e-6)
