"""VeraLinear against PEFT 0.21.2's VeRA layer: same numbers for forward, gradients, delta weight and merges."""

import copy

import pytest
import torch
from torch import nn

from vera_ext import VeraLinear, VeraProjection

from vera_testing import DEVICES, LOW_PRECISION, assert_low_precision_close, make_peft_vera_linear


def pair(in_f, out_f, r, device="cpu", bias=True, seed=0, init_weights=False, **kwargs):
    """(ours, peft) around identical copies of one nn.Linear, sharing one projection, with equal lambdas."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(device)
    proj = VeraProjection.from_key(r, in_f, out_f, prng_key=seed).to(device)
    torch.manual_seed(seed + 1)
    ours = VeraLinear(copy.deepcopy(base), r, projection=proj, init_weights=init_weights, **kwargs)
    torch.manual_seed(seed + 1)
    peft_kwargs = {"vera_dropout": kwargs.get("vera_dropout", 0.0), "init_weights": init_weights}
    peft = make_peft_vera_linear(base, proj.vera_A.clone(), proj.vera_B.clone(), r, **peft_kwargs).to(device)
    return ours, peft


def test_lambda_init_matches_peft():
    for init_weights in (True, False):
        ours, peft = pair(12, 10, 4, init_weights=init_weights)
        assert torch.equal(ours.vera_lambda_d["default"], peft.vera_lambda_d["default"])
        assert torch.equal(ours.vera_lambda_b["default"], peft.vera_lambda_b["default"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5), (2, 1, 3, 5)])
def test_forward_and_gradients_match_peft(device, shape):
    in_f, out_f, r = 24, 18, 8
    ours, peft = pair(in_f, out_f, r, device)
    x = torch.randn(*shape[:-1], in_f, device=device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), peft(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name in ("vera_lambda_d", "vera_lambda_b"):
        torch.testing.assert_close(
            getattr(ours, name)["default"].grad, getattr(peft, name)["default"].grad, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_and_no_bias(device):
    ours, peft = pair(16, 12, 6, device, bias=False)
    x = torch.randn(16, 7, device=device).T  # (7, 16), not contiguous
    torch.testing.assert_close(ours(x), peft(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_layers_of_different_shapes_share_one_projection(device):
    proj = VeraProjection.from_key(8, 40, 30).to(device)
    layers = [
        VeraLinear(nn.Linear(i, o).to(device), 8, projection=proj, init_weights=False)
        for i, o in [(40, 30), (17, 9), (1, 30), (40, 1)]
    ]
    for layer in layers:
        x = torch.randn(3, layer.in_features, device=device)
        A = proj.vera_A[:8, : layer.in_features]
        B = proj.vera_B[: layer.out_features, :8]
        ld, lb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
        expected = layer.base_layer(x) + lb * (((x @ A.T) * ld) @ B.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert all(layer.vera_A["default"] is proj.vera_A for layer in layers)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_peft_under_seed(device):
    ours, peft = pair(20, 14, 6, device, vera_dropout=0.3)
    ours.train()
    peft.train()
    x = torch.randn(9, 20, device=device)
    torch.manual_seed(123)
    y1 = ours(x)
    torch.manual_seed(123)
    y2 = peft(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    ours.eval()
    peft.eval()
    y_eval = ours(x)
    torch.testing.assert_close(y_eval, peft(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y_eval)  # dropout really acted in training mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_delta_weight_and_merge_match_peft(device, fan_in_fan_out):
    ours, peft = pair(21, 13, 5, device)
    if fan_in_fan_out:  # PEFT's layer with fan_in_fan_out stores the (in, out) weight of a Conv1D
        for layer in (ours, peft):
            layer.fan_in_fan_out = True
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().T.contiguous(), requires_grad=False)
    torch.testing.assert_close(ours.get_delta_weight("default"), peft.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    before = ours.base_layer.weight.detach().clone()
    ours.merge()
    peft.merge()
    torch.testing.assert_close(ours.base_layer.weight, peft.base_layer.weight, rtol=1e-6, atol=1e-6)
    assert ours.merged and ours.merged_adapters == ["default"]
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, before, rtol=0, atol=1e-6)
    assert not ours.merged


@pytest.mark.parametrize("device", DEVICES)
def test_merged_output_equals_unmerged(device):
    ours, _ = pair(30, 22, 8, device)
    x = torch.randn(4, 30, device=device)
    y = ours(x)
    ours.merge(safe_merge=True)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_several_adapters_sum_and_switch_like_peft(device):
    ours, peft = pair(12, 10, 4, device)
    torch.manual_seed(7)
    ours.update_layer("other", 4, init_weights=False)
    torch.manual_seed(7)
    peft.update_layer("other", peft.vera_A, peft.vera_B, 4, config=peft_config(4))
    x = torch.randn(6, 12, device=device)
    for active in (["other"], ["default", "other"], ["default"]):
        ours.set_adapter(active)
        peft.set_adapter(active)
        torch.testing.assert_close(ours(x), peft(x), rtol=1e-5, atol=1e-5)
    ours.set_adapter(["default", "other"])
    peft.set_adapter(["default", "other"])
    ours.merge()
    peft.merge()
    torch.testing.assert_close(ours.base_layer.weight, peft.base_layer.weight, rtol=1e-6, atol=1e-6)


def peft_config(r):
    from peft import VeraConfig

    return VeraConfig(r=r, target_modules=["base"], init_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_disable_and_delete_adapter(device):
    ours, _ = pair(12, 10, 4, device)
    x = torch.randn(3, 12, device=device)
    ours.merge()
    ours.enable_adapters(False)
    torch.testing.assert_close(ours(x), nn.functional.linear(x, ours.base_layer.weight, ours.base_layer.bias))
    assert not ours.merged  # disabling unmerges, as PEFT does
    ours.enable_adapters(True)
    ours.update_layer("second", 3)
    ours.delete_adapter("default")
    assert ours.active_adapters == ["second"] and list(ours.vera_lambda_d.keys()) == ["second"]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapter_batch_equals_each_sample_alone(device):
    ours, _ = pair(16, 12, 6, device)
    ours.update_layer("small", 3, init_weights=False)  # another rank: lambda_d is zero-padded internally
    x = torch.randn(5, 4, 16, device=device, requires_grad=True)
    names = ["default", "__base__", "small", "default", "small"]
    y = ours(x, adapter_names=names)
    for s, name in enumerate(names):
        if name == "__base__":
            with torch.no_grad():
                ours.enable_adapters(False)
                expected = ours(x[s])
                ours.enable_adapters(True)
        else:
            ours.set_adapter(name)
            expected = ours(x[s])
        torch.testing.assert_close(y[s], expected, rtol=1e-5, atol=1e-5)
    ours.vera_lambda_d["default"].grad = None
    y[1].sum().backward()  # a "__base__" row: no adapter receives gradient
    assert ours.vera_lambda_d["default"].grad is None or not ours.vera_lambda_d["default"].grad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_layer_within_twice_pytorch_error(device, dtype):
    in_f, out_f, r = 64, 48, 32
    ours, _ = pair(in_f, out_f, r, device)
    ours.to(dtype)
    ours.vera_lambda_d["default"].data = ours.vera_lambda_d["default"].float()  # lambdas stay fp32
    ours.vera_lambda_b["default"].data = ours.vera_lambda_b["default"].float()
    ours.vera_projection.to(torch.float32)
    x = torch.randn(40, in_f, device=device).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    w, b = ours.base_layer.weight, ours.base_layer.bias
    A, B = ours.vera_projection.vera_A[:r, :in_f], ours.vera_projection.vera_B[:out_f, :r]
    ld, lb = ours.vera_lambda_d["default"], ours.vera_lambda_b["default"]
    d = torch.float64
    ref = x.to(d) @ w.to(d).T + b.to(d) + lb.to(d) * (((x.to(d) @ A.to(d).T) * ld.to(d)) @ B.to(d).T)
    same = nn.functional.linear(x, w, b) + lb.to(dtype) * nn.functional.linear(
        ld.to(dtype) * nn.functional.linear(x, A.to(dtype)), B.to(dtype)
    )
    assert_low_precision_close(y.detach(), same.detach(), ref.detach())


def test_projection_cast_is_cached():
    ours, _ = pair(16, 12, 6)
    proj = ours.vera_projection
    a1, _ = proj.cast(torch.bfloat16, torch.device("cpu"))
    a2, _ = proj.cast(torch.bfloat16, torch.device("cpu"))
    assert a1 is a2
    with torch.no_grad():
        proj.vera_A.mul_(2)  # an in-place change invalidates the cache
    a3, _ = proj.cast(torch.bfloat16, torch.device("cpu"))
    assert a3 is not a1 and torch.equal(a3, proj.vera_A.to(torch.bfloat16))


def test_projection_from_key_is_bit_identical_to_peft():
    from peft import VeraConfig, get_peft_model

    model = nn.Sequential()
    model.add_module("lin", nn.Linear(23, 17))
    peft_model = get_peft_model(model, VeraConfig(r=5, target_modules=["lin"], projection_prng_key=42))
    proj = VeraProjection.from_key(5, 23, 17, prng_key=42)
    assert torch.equal(proj.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, peft_model.base_model.vera_B["default"])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_through_the_layer(device):
    ours, peft = pair(10, 8, 4, device)
    x = torch.randn(0, 3, 10, device=device, requires_grad=True)
    y = ours(x)
    assert y.shape == (0, 3, 8)
    torch.testing.assert_close(y, peft(x))
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("fused", [True, False])
def test_saved_activations_are_only_u(fused):
    """Backward keeps u = x A^T (N x r) and nothing else that grows with N (DESIGN §2); PEFT keeps far more."""
    from vera_ext.bench.timing import saved_activation_bytes

    n, in_f, out_f, r = 64, 48, 40, 16
    ours, peft = pair(in_f, out_f, r)
    if not fused:  # a base module that is not a plain nn.Linear takes the unfused path
        ours.base_layer.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(n, in_f, requires_grad=True)
    assert saved_activation_bytes(ours, x) == n * r * 4
    assert saved_activation_bytes(peft, x) >= n * (in_f + r + out_f) * 4  # x, u, z at least
