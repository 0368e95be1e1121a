"""Bad inputs: each gets a clear error naming the argument, and leaves weights and adapters as they were."""

import pytest
import torch
from torch import nn

from vera_ext import VeraLinear, VeraProjection, ops

from test_ops import make_case

OPS = torch.ops.vera_ext


def snapshot(module: nn.Module):
    return (
        {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        dict(module.r),
        list(module.merged_adapters),
        list(module.active_adapters),
    )


def assert_unchanged(module: nn.Module, snap):
    tensors, r, merged, active = snap
    now = module.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():  # byte for byte (NaN payloads included)
        assert torch.equal(_bytes(now[k].detach()), _bytes(v)), f"{k} changed"
    assert module.r == r and module.merged_adapters == merged and module.active_adapters == active


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def make_layer(in_f=12, out_f=10, r=4, **kwargs):
    torch.manual_seed(0)
    return VeraLinear(nn.Linear(in_f, out_f), r, init_weights=False, **kwargs)


# ------------------------------------------------------------------------------------------------ op level


def _call_forward(**overrides):
    x, base, A, B, ld, lb = make_case(5, 8, 6, 4)
    args = dict(x=x, base_out=base, A=A, B=B, lambda_d=ld, lambda_b=lb, adapter_idx=None)
    args.update(overrides)
    return OPS.vera_forward(*args.values())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(x=torch.randn(5, 8, 1)), "x must be 2-D"),
        (dict(x=torch.randint(0, 3, (5, 8))), "x must be float32, float16 or bfloat16"),
        (dict(base_out=torch.randn(4, 6)), "base_out must have shape"),
        (dict(base_out=torch.randn(5, 6, dtype=torch.float64)), "base_out must have the dtype of x"),
        (dict(A=torch.randn(4, 9)), r"A must have shape \(r=4, in_features=8\)"),
        (dict(A=torch.randn(4, 8, dtype=torch.bfloat16)), "A must have the dtype of x"),
        (dict(B=torch.randn(7, 4)), r"B must have shape \(out_features=6, r=4\)"),
        (dict(lambda_d=torch.randn(4, dtype=torch.float16)), "lambda_d must be Float"),
        (dict(lambda_d=torch.randn(0)), "lambda_d must hold r >= 1"),
        (dict(lambda_b=torch.randn(5)), r"lambda_b must have shape \(out_features=6,\)"),
        (dict(adapter_idx=torch.zeros(5, dtype=torch.int32)), "adapter_idx must be an int64 vector"),
        (dict(adapter_idx=torch.zeros(4, dtype=torch.int64)), "adapter_idx must be an int64 vector"),
    ],
)
def test_forward_op_rejects_bad_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _call_forward(**overrides)


def test_forward_op_rejects_out_of_range_adapter_index():
    x, base, A, B, ld, lb = make_case(3, 8, 6, 4, num_adapters=2)
    with pytest.raises(RuntimeError, match=r"adapter_idx\[1\] = 2 is out of range"):
        OPS.vera_forward(x, base, A, B, ld, lb, torch.tensor([0, 2, -1]))
    with pytest.raises(RuntimeError, match="must stack the same adapters"):
        OPS.vera_forward(x, base, A, B, ld, lb[:1], torch.tensor([0, 1, -1]))


def test_merge_op_rejects_wrong_weight_and_leaves_it():
    _, _, A, B, ld, lb = make_case(1, 8, 6, 4)
    weight = torch.randn(8, 6)  # (in, out) without fan_in_fan_out
    before = weight.clone()
    with pytest.raises(RuntimeError, match=r"weight must have shape \(6, 8\)"):
        ops.vera_merge_(weight, A, B, ld, lb)
    assert torch.equal(weight, before)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        ops.vera_merge_(torch.zeros(6, 8, dtype=torch.int32), A, B, ld, lb)


@pytest.mark.cuda
def test_device_mismatch_is_named():
    x, base, A, B, ld, lb = make_case(5, 8, 6, 4, device="cuda")
    with pytest.raises(RuntimeError, match="A must be on the same device as x"):
        OPS.vera_forward(x, base, A.cpu(), B, ld, lb, None)
    with pytest.raises(RuntimeError, match="lambda_b must be on the same device as x"):
        OPS.vera_forward(x, base, A, B, ld, lb.cpu(), None)


@pytest.mark.cuda
def test_float64_on_cuda_is_refused_up_front():
    x, base, A, B, ld, lb = make_case(5, 8, 6, 4, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="x may be float64 only on the CPU"):
        OPS.vera_forward(x, base, A, B, ld, lb, None)


def test_projection_must_not_require_grad():
    x, base, A, B, ld, lb = make_case(5, 8, 6, 4)
    with pytest.raises(RuntimeError, match="frozen"):
        ops.vera_forward(x, base, A.clone().requires_grad_(True), B, ld.requires_grad_(True), lb)


# --------------------------------------------------------------------------------------------- layer level


def test_rank_or_features_beyond_the_projection():
    proj = VeraProjection.from_key(4, 12, 10)
    with pytest.raises(ValueError, match=r"r=8 does not fit the shared VeRA projection"):
        VeraLinear(nn.Linear(12, 10), 8, projection=proj)
    with pytest.raises(ValueError, match=r"in_features=13 does not fit"):
        VeraLinear(nn.Linear(13, 10), 4, projection=proj)
    with pytest.raises(ValueError, match=r"out_features=11 does not fit"):
        VeraLinear(nn.Linear(12, 11), 4, projection=proj)
    with pytest.raises(ValueError, match="positive integer"):
        VeraLinear(nn.Linear(12, 10), 0)
    with pytest.raises(TypeError, match="base_layer of type ReLU is not supported"):
        VeraLinear(nn.ReLU(), 4)


def test_refused_update_layer_keeps_existing_adapter():
    layer = make_layer()
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="r=9 does not fit"):
        layer.update_layer("default", 9)
    with pytest.raises(ValueError, match="vera_dropout must be a float in"):
        layer.update_layer("default", 4, vera_dropout=1.5)
    with pytest.raises(ValueError, match="reserved"):
        layer.update_layer("__base__", 4)
    assert_unchanged(layer, snap)


def test_unknown_adapter_names():
    layer = make_layer()
    snap = snapshot(layer)
    for call in (
        lambda: layer.set_adapter("nope"),
        lambda: layer.merge(adapter_names=["nope"]),
        lambda: layer.get_delta_weight("nope"),
        lambda: layer.delete_adapter("nope"),
    ):
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
            call()
    assert_unchanged(layer, snap)


def test_safe_merge_refuses_broken_adapter_and_keeps_everything():
    layer = make_layer()
    with torch.no_grad():
        layer.vera_lambda_b["default"][3] = float("nan")
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert_unchanged(layer, snap)
    assert not layer.merged


def test_wrong_input_features_keep_adapter():
    layer = make_layer()
    snap = snapshot(layer)
    with pytest.raises(
        RuntimeError, match=r"x must have in_features=12 as its last dimension, got x of shape \(3, 11\)"
    ):
        layer(torch.randn(3, 11))
    assert_unchanged(layer, snap)


def test_mixed_batch_errors():
    layer = make_layer()
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        layer(x, adapter_names=["default"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        layer(x, adapter_names=["default", "ghost", "__base__"])
    layer.merge()
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="merged adapters"):
        layer(x, adapter_names=["default"] * 3)
    assert_unchanged(layer, snap)


def test_merged_adapter_cannot_be_deleted_or_updated():
    layer = make_layer()
    layer.merge()
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("default")
    with pytest.raises(ValueError, match="unmerge"):
        layer.update_layer("default", 4)
    assert_unchanged(layer, snap)


def test_merge_needs_a_weight():
    class Doubler(nn.Module):
        in_features, out_features = 6, 6

        def forward(self, x):
            return 2 * x

    layer = VeraLinear(Doubler(), 3, init_weights=False)
    x = torch.randn(2, 6)
    A, B = layer.vera_projection.vera_A[:3, :6], layer.vera_projection.vera_B[:6, :3]
    ld, lb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    torch.testing.assert_close(layer(x), 2 * x + lb * (((x @ A.T) * ld) @ B.T))  # any base module works unmerged
    with pytest.raises(TypeError, match="only nn.Linear and Conv1D"):
        layer.merge()
    assert not layer.merged
