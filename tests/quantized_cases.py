"""Shared builders for the quantized-base tests: small MLPs whose Linear layers are quantized by bitsandbytes (its
CPU backend) or torchao, and the same model under PEFT 0.21.2's VeRA and under vera_ext. Dims are multiples of 64
(bitsandbytes' 4-bit blocks, and its CPU repacking wants out_features % 32 == 0)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="the quantized-base tests need bitsandbytes (requirements-test.txt)")
torchao = pytest.importorskip("torchao", reason="the quantized-base tests need torchao (requirements-test.txt)")

from vera_ext import VeraConfig, get_vera_model, quantized  # noqa: E402

IN, HID, OUT, R = 128, 64, 64, 16
TARGETS = ["lin0", "lin1"]

# (kind, model dtype, bitsandbytes compute dtype, double quantization): every kind, both float widths, both
# 4-bit types with and without double quantization and with compute dtypes equal to and unlike the model's.
CASES = [
    ("nf4", torch.float32, torch.float32, True),
    ("nf4", torch.bfloat16, torch.bfloat16, False),
    ("fp4", torch.float32, torch.bfloat16, False),
    ("fp4", torch.float16, torch.float16, True),
    ("int8", torch.float32, None, None),
    ("int8", torch.bfloat16, None, None),
    ("torchao_int8", torch.float32, None, None),
    ("torchao_int4", torch.bfloat16, None, None),
]


def case_id(case):
    kind, dtype, cdt, dq = case
    parts = [kind, str(dtype).split(".")[-1]]
    if cdt is not None:
        parts.append(f"compute_{str(cdt).split('.')[-1]}")
    if dq is not None:
        parts.append("dq" if dq else "nodq")
    return "-".join(parts)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(IN, HID)
        self.lin1 = nn.Linear(HID, OUT)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def torchao_config(kind):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if kind == "torchao_int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def quantized_mlp(case, seed=0):
    """A seeded MLP in the case's dtype with both Linear layers quantized."""
    kind, dtype, cdt, dq = case
    torch.manual_seed(seed)
    model = MLP().to(dtype)
    quantized.quantize_linears(model, kind, compute_dtype=cdt, compress_statistics=bool(dq))
    if kind.startswith("torchao"):
        # PEFT finds torchao's re-quantization config on a transformers model's quantizer; give it the same one.
        config = torchao_config(kind)
        qc = types.SimpleNamespace(get_apply_tensor_subclass=lambda: copy.deepcopy(config))
        model.hf_quantizer = types.SimpleNamespace(quantization_config=qc)
    return model


def pair(case, seed=0, init_weights=False, **config):
    """(ours, peft): vera_ext and PEFT VeRA on two copies of one quantized MLP, with equal lambdas."""
    import peft

    base = quantized_mlp(case, seed)
    kwargs = dict(r=R, target_modules=TARGETS, init_weights=init_weights, **config)
    torch.manual_seed(seed + 1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**kwargs))
    torch.manual_seed(seed + 1)
    ours = get_vera_model(copy.deepcopy(base), VeraConfig(**kwargs))
    return ours, theirs


def set_lambdas(models, seed=3, scale_b=0.05, adapter="default"):
    """Give every model the same trained-looking lambdas (lambda_b small, as after fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in TARGETS:
            first = layer_of(models[0], name)
            ld = torch.randn(first.vera_lambda_d[adapter].shape, generator=g)
            lb = torch.randn(first.vera_lambda_b[adapter].shape, generator=g) * scale_b
            for m in models:
                layer = layer_of(m, name)
                layer.vera_lambda_d[adapter].copy_(ld)
                layer.vera_lambda_b[adapter].copy_(lb)


def lambda_grads(model):
    """{(layer, "d" or "b"): gradient} of the adapter "default"."""
    out = {}
    for name in TARGETS:
        layer = layer_of(model, name)
        out[(name, "d")] = layer.vera_lambda_d["default"].grad
        out[(name, "b")] = layer.vera_lambda_b["default"].grad
    return out


def layer_of(model, name):
    """The VeRA layer (ours or PEFT's) at `name` of a wrapped MLP."""
    for path, module in model.named_modules():
        if path.endswith(name) and hasattr(module, "vera_lambda_d"):
            return module
    raise KeyError(name)


def reference_forward(model, x):
    """The VeRA MLP in float64 on the dequantized weights and the model's own lambdas and projection (leaves of a
    fresh graph: returns y and the float64 lambda leaves, in named order)."""
    leaves = {}

    def layer(name, h):
        vl = layer_of(model, name)
        base = vl.base_layer
        W = quantized.dequantize_weight(base, torch.float64)
        A = vl.vera_A["default"][:R, : vl.in_features].double()
        B = vl.vera_B["default"][: vl.out_features, :R].double()
        ld = vl.vera_lambda_d["default"].detach().double().requires_grad_(True)
        lb = vl.vera_lambda_b["default"].detach().double().requires_grad_(True)
        leaves[name] = (ld, lb)
        return h @ W.T + base.bias.double() + lb * (((h @ A.T) * ld) @ B.T)

    y = layer("lin1", torch.relu(layer("lin0", x)))
    return y, leaves
