"""VeraLinear's forward plan (docs/DESIGN.md §6): the decisions of a forward are made once and reused while the
adapters, modes, dtypes, devices, hooks and autocast stay as they were; each change re-plans, and every call gives
what a layer that never planned before gives. Bad inputs are refused naming x, its shape and in_features."""

from __future__ import annotations

import copy

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


def reference(layer: VeraLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64, from its parameters (one active adapter, no dropout)."""
    name = layer.active_adapters[0]
    proj = layer.vera_projection
    A, B = proj.vera_A[: layer.r[name], :I], proj.vera_B[:O, : layer.r[name]]
    base = nn.functional.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double())
    ld, lb = layer.vera_lambda_d[name].detach(), layer.vera_lambda_b[name].detach()
    return vera_reference(x.double(), base, A.double(), B.double(), ld.double(), lb.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(I,), (1, I), (5, I), (2, 3, I), (0, I), (40, I)])
def test_outputs_and_gradients_against_float64(device, dtype, shape):
    layer = make_layer(dtype, device)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], O)
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    lam64 = [layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]]
    ref_layer = copy.deepcopy(layer).double()
    ref_layer(x64).square().sum().backward()
    for got, want in zip(
        [x.grad] + [p.grad for p in lam64],
        [x64.grad] + [ref_layer.vera_lambda_d["default"].grad, ref_layer.vera_lambda_b["default"].grad],
    ):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_plan_is_made_once_and_reused():
    layer = make_layer().eval()
    x = torch.randn(3, I)
    layer(x)
    plan = layer._plan
    assert plan.kind == "adapters" and plan.fused == "default" and plan.added == ()
    layer(torch.randn(7, I))  # (other rows: the same decisions)
    assert layer._plan is plan


def _two_active(layer):
    layer.update_layer("other", R, init_weights=False)
    layer.set_adapter(["default", "other"])


# Each state change, and what the plan must say after it.
CHANGES = {
    "two active adapters (summed)": (_two_active, "adapters"),
    "merged adapter (base layer alone)": (lambda layer: layer.merge(), "base"),
    "adapters disabled": (lambda layer: layer.enable_adapters(False), "disabled"),
    "forward hook on the base layer": (
        lambda layer: layer.base_layer.register_forward_hook(lambda m, i, o: o * 2),
        "adapters",
    ),
    "forward pre-hook on the base layer": (
        lambda layer: layer.base_layer.register_forward_pre_hook(lambda m, i: (i[0] * 2,)),
        "adapters",
    ),
    "active dropout in training": (
        lambda layer: (layer.update_layer("drop", R, vera_dropout=0.5, init_weights=False), layer.set_adapter("drop")),
        "adapters",
    ),
    "dropout module switched to training alone": (
        lambda layer: (
            layer.update_layer("drop", R, vera_dropout=0.5),
            layer.set_adapter("drop"),
            layer.vera_dropout["drop"].train(),
        ),
        "adapters",
    ),
    "adapter deleted": (
        lambda layer: (
            layer.update_layer("b", R, init_weights=False),
            layer.set_adapter("b"),
            layer.delete_adapter("default"),
        ),
        "adapters",
    ),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_every_change_replans_and_matches_a_fresh_layer(case):
    layer = make_layer().eval()
    x = torch.randn(4, I)
    layer(x)
    before = layer._plan
    change, kind = CHANGES[case]
    change(layer)
    fresh = copy.deepcopy(layer)
    fresh._plan = None
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    assert torch.equal(y, fresh(x))
    assert layer._plan is not before and layer._plan.kind == kind


def test_dropout_follows_train_and_eval():
    layer = make_layer(vera_dropout=0.5).eval()
    x = torch.randn(4, I)
    layer(x)
    assert layer._plan.fused == "default"  # no dropout in eval: the fused op
    layer.train()
    layer(x)
    assert layer._plan.fused is None and layer._plan.added[0][0] == "default"
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_linear_subclass_and_fan_in_fan_out_run_their_own_forward():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    layer = VeraLinear(ScaledLinear(I, O), R, init_weights=False)
    x = torch.randn(2, I)
    y = layer(x)
    assert layer._plan.fused is None
    A, B = layer.vera_projection.vera_A[:R, :I], layer.vera_projection.vera_B[:O, :R]
    ref = vera_reference(
        x,
        layer.base_layer(x).detach(),
        A,
        B,
        layer.vera_lambda_d["default"].detach(),
        layer.vera_lambda_b["default"].detach(),
    )
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    conv = VeraLinear(nn.Linear(I, O), R, fan_in_fan_out=True)
    conv(x)
    assert conv._plan.fused is None


def test_other_dtypes_and_autocast_replan():
    layer = make_layer()
    x = torch.randn(2, I)
    layer(x)
    assert layer._plan.fused == "default"
    layer.double()(x.double())
    assert layer._plan.compute_dtype == torch.float64
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert layer._plan.fused == "default" and layer._plan.compute_dtype == torch.bfloat16
        assert y.dtype == autocast_dtype(x) == torch.bfloat16
    layer(x)
    assert layer._plan.compute_dtype == torch.float32


def test_extra_arguments_and_mixed_batches():
    vm = ours(mlp(), r=6, target_modules=["lin0"], init_weights=False)
    vm.add_adapter("b", VeraConfig(r=6, target_modules=["lin0"], init_weights=False))
    x = torch.randn(2, 10)
    mixed = vm(x, adapter_names=["default", "b"])
    vm.set_adapter("b")
    torch.testing.assert_close(mixed[1:], vm(x[1:]))
    vm.set_adapter("default")
    torch.testing.assert_close(mixed[:1], vm(x[:1]))


def test_follows_changed_lambdas_and_projection():
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


@pytest.mark.parametrize(
    "x, error, match",
    [
        (
            torch.randn(3, 15),
            RuntimeError,
            r"x must have in_features=16 as its last dimension, got x of shape \(3, 15\)",
        ),
        (torch.tensor(1.0), RuntimeError, r"x must have in_features=16 as its last dimension, got x of shape \(\)"),
        ([1.0] * 16, TypeError, r"x must be a Tensor of shape \(\.\.\., in_features=16\), got list"),
    ],
)
def test_bad_input_names_x_its_shape_and_in_features(x, error, match):
    layer = VeraLinear(nn.Linear(16, 4), r=4, init_weights=False)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(x)
    with pytest.raises(error, match=match):
        layer(x, adapter_names=["default"] * 3)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
