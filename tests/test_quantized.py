"""Quantized base layers (bitsandbytes 4-bit/8-bit on its CPU backend, torchao int8/int4 weight-only) against PEFT
0.21.2's VeRA on the same quantized model and a float64 computation on the dequantized weights: forward and
gradients, merge / unmerge / safe merge / merge_and_unload, patch_peft, checkpoints both ways, refused calls.

Not covered here (no CPU kernel in this environment): torchao's Int4WeightOnlyConfig (Int4Tensor needs mslk/CUDA).
Run as a script to print the numbers the README quotes: python tests/test_quantized.py
"""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from quantized_cases import (
    CASES,
    IN,
    TARGETS,
    case_id,
    lambda_grads,
    layer_of,
    pair,
    quantized_mlp,
    reference_forward,
    set_lambdas,
)

from vera_ext import VeraLinear, VeraModel, patch_peft, quantized, unpatch_peft

IDS = [case_id(c) for c in CASES]
# Largest unmerge error (merge then unmerge, each quantizing again) as a fraction of max |W|, measured per kind
# with trained-looking lambdas (README, "Quantized base models"); the test allows 25% above the measurement.
UNMERGE_BOUND = {"nf4": 0.30, "fp4": 0.31, "int8": 0.0087, "torchao_int8": 0.0085, "torchao_int4": 0.151}


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _floor(ref, dtype):
    return torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def forward_backward_errors(case, seed=0):
    """{what: (our error, PEFT's error)} against the float64 reference, and a floor of one ulp of the scale."""
    ours, theirs = pair(case, seed)
    set_lambdas([ours, theirs], seed)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(seed)).to(case[1])
    x1, x2, x3 = (
        x.clone().double().requires_grad_(True) if i == 2 else x.clone().requires_grad_(True) for i in range(3)
    )
    y1, y2 = ours(x1), theirs(x2)
    y3, leaves = reference_forward(ours, x3)
    g = torch.randn(y1.shape, generator=torch.Generator().manual_seed(seed + 7))
    y1.backward(g.to(y1.dtype))
    y2.backward(g.to(y2.dtype))
    y3.backward(g.double())
    out = {"y": (y1, y2, y3.detach()), "grad_x": (x1.grad, x2.grad, x3.grad)}
    g1, g2 = lambda_grads(ours), lambda_grads(theirs)
    for (name, which), grad in g1.items():
        ref = leaves[name][0 if which == "d" else 1].grad
        out[f"grad_lambda_{which}[{name}]"] = (grad, g2[(name, which)], ref)
    return {k: (_err(a, r), _err(b, r), _floor(r, a.dtype)) for k, (a, b, r) in out.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_within_twice_peft_error(case):
    for what, (ours_err, peft_err, floor) in forward_backward_errors(case).items():
        assert ours_err <= 2 * peft_err + floor, f"{what}: ours {ours_err:.3g} vs PEFT {peft_err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_calls_the_quantized_layer_and_keeps_no_dense_weight(case):
    ours, _ = pair(case)
    calls = []
    layer = layer_of(ours, "lin0")
    layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    x = torch.randn(3, IN, dtype=case[1], requires_grad=True)
    ours(x).sum().backward()
    assert calls, "the quantized base layer's own forward must compute the base term"
    assert quantized.is_quantized(layer.base_layer)
    # nothing dense of the base's (out, in) size is kept on the layer
    dense = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.dtype.is_floating_point and t.dim() == 2]
    assert all(t.shape != (layer.out_features, layer.in_features) or t is layer.base_layer.weight for t in dense)


def _snapshot(base):
    """Every stored tensor of a quantized layer (packed weight, quantization statistics), cloned."""
    out = {}
    for k, v in base.state_dict(keep_vars=True).items():
        names = getattr(type(v), "tensor_data_names", None)
        if names:  # torchao tensor subclass: its plain tensors
            out.update({f"{k}.{n}": getattr(v, n).detach().clone() for n in names})
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _settings(model):
    return {n: quantized.quantization_of(getattr(model, n)).settings(getattr(model, n)) for n in TARGETS}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_equals_peft_and_keeps_the_quantization(case):
    ours, theirs = pair(case)
    set_lambdas([ours, theirs])
    settings_before = {
        n: quantized.quantization_of(layer_of(ours, n).base_layer).settings(layer_of(ours, n).base_layer)
        for n in TARGETS
    }
    x = torch.randn(6, IN, dtype=case[1])
    with torch.no_grad():
        unmerged = ours(x)
    m1, m2 = ours.merge_and_unload(safe_merge=True), theirs.merge_and_unload()
    for n in TARGETS:
        assert type(getattr(m1, n)) is type(getattr(m2, n))
        assert quantized.is_quantized(getattr(m1, n))
        # same requantization as PEFT's, so the same stored bytes
        assert torch.equal(quantized.dequantize_weight(getattr(m1, n)), quantized.dequantize_weight(getattr(m2, n)))
    assert _settings(m1) == settings_before == _settings(m2)
    with torch.no_grad():
        merged, peft_merged = m1(x), m2(x)
    torch.testing.assert_close(merged, peft_merged, rtol=0, atol=0)
    # merging moved the output from the base model's towards the adapted one
    assert (merged.float() - unmerged.float()).abs().max() < 0.5 * unmerged.float().abs().max()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unmerge_restores_the_weight_up_to_requantization(case):
    ours, theirs = pair(case)
    set_lambdas([ours, theirs])
    before = {n: quantized.dequantize_weight(layer_of(ours, n).base_layer) for n in TARGETS}
    ours.merge_adapter()
    theirs.merge_adapter()
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    for n in TARGETS:
        after = quantized.dequantize_weight(layer_of(ours, n).base_layer)
        rel = ((after - before[n]).abs().max() / before[n].abs().max()).item()
        assert rel <= 1.25 * UNMERGE_BOUND[case[0]], f"{n}: unmerge error {rel:.4f} of max |W|"
        assert torch.equal(after, quantized.dequantize_weight(layer_of(theirs, n).base_layer))
        assert not layer_of(ours, n).merged


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[7]], ids=[IDS[0], IDS[1], IDS[4], IDS[7]])
def test_refused_safe_merge_leaves_the_quantized_weight_byte_for_byte(case):
    ours, _ = pair(case)
    layer = layer_of(ours, "lin1")
    with torch.no_grad():
        layer.vera_lambda_b["default"][3] = float("inf")
    before = {n: _snapshot(layer_of(ours, n).base_layer) for n in TARGETS}
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_and_unload(safe_merge=True)
    for n in TARGETS:
        assert _same(_snapshot(layer_of(ours, n).base_layer), before[n]), n
        assert not layer_of(ours, n).merged


def test_safe_merge_refuses_a_weight_int8_cannot_hold():
    """bitsandbytes quantizes int8 from fp16: a merged value beyond fp16's range is refused, nothing written."""
    ours, _ = pair(CASES[4])
    layer = layer_of(ours, "lin0")
    with torch.no_grad():
        layer.vera_lambda_b["default"].fill_(1e12)
    before = _snapshot(layer.base_layer)
    with pytest.raises(ValueError, match="fp16"):
        layer.merge(safe_merge=True)
    assert _same(_snapshot(layer.base_layer), before) and not layer.merged


class PackedInt8(nn.Module):
    """A quantized layer vera_ext does not know: int8 weight, in/out features, its own forward."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randint(-5, 5, (out_features, in_features), dtype=torch.int8), False)

    def forward(self, x):
        return x @ self.weight.to(x.dtype).T * 0.01


def test_unknown_quantized_type_is_refused_clearly_and_changes_nothing():
    base = PackedInt8(16, 8)
    with pytest.raises(TypeError, match=r"PackedInt8.*int8.*supported: bitsandbytes Linear4bit"):
        quantized.quantization_of(base)
    layer = VeraLinear(base, 4, init_weights=False)
    x = torch.randn(3, 16)
    expected = base(x) + layer.vera_lambda_b["default"] * (
        ((x @ layer.vera_projection.vera_A[:4, :16].T) * layer.vera_lambda_d["default"])
        @ layer.vera_projection.vera_B[:8, :4].T
    )
    torch.testing.assert_close(layer(x), expected)  # usable unmerged
    weight = base.weight.detach().clone()
    with pytest.raises(TypeError, match="PackedInt8"):
        layer.merge()
    assert torch.equal(base.weight, weight) and not layer.merged


def test_write_weight_checks_its_argument_and_changes_nothing():
    ours, _ = pair(CASES[0])
    base = layer_of(ours, "lin0").base_layer
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"weight must be a floating-point tensor of shape \(64, 128\)"):
        quantized.write_weight_(base, torch.zeros(128, 64))
    bad = quantized.dequantize_weight(base)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantized.write_weight_(base, bad)
    with pytest.raises(TypeError, match="not quantized"):
        quantized.write_weight_(nn.Linear(4, 4), torch.zeros(4, 4))
    assert _same(_snapshot(base), before)
    with pytest.raises(ValueError, match="kind must be one of"):
        quantized.quantize_linears(nn.Linear(4, 4), "nf3")


def test_merge_after_bitsandbytes_repacked_the_weight_for_its_cpu_kernel():
    """An eval forward without grad lets bitsandbytes repack a 4-bit CPU weight for its AVX512-BF16 kernel (absmax
    rounded to bf16): dequantizing reads the weight bitsandbytes computes with, and the merge matches the twin
    merged from the unpacked weight up to that rounding."""
    ours, _ = pair(CASES[0])
    twin = copy.deepcopy(ours)
    set_lambdas([ours, twin])
    base = layer_of(ours, "lin0").base_layer
    x = torch.randn(4, IN)
    ours.eval()
    with torch.no_grad():
        y = base(x)
    # (bitsandbytes' repacked kernel computes in bf16)
    torch.testing.assert_close(
        y, nn.functional.linear(x, quantized.dequantize_weight(base), base.bias), rtol=1e-2, atol=1e-2
    )
    merged, twin_merged = ours.merge_and_unload(), twin.merge_and_unload()
    with torch.no_grad():
        a, b = merged(x), twin_merged(x)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_patch_peft_routes_quantized_layers_and_matches_unpatched_peft():
    case = CASES[1]
    ours, theirs = pair(case)
    set_lambdas([theirs])
    patched = copy.deepcopy(theirs)
    x = torch.randn(5, IN, dtype=case[1])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref = theirs(x1)
    y_ref.float().sum().backward()
    patch_peft()
    try:
        calls = []
        with _count(calls):
            y = patched(x2)
        assert calls, "the patched PEFT layer must run vera_ext's op"
        y.float().sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x2.grad, x1.grad)
        merged = copy.deepcopy(patched).merge_and_unload(safe_merge=True)
        peft_merged = copy.deepcopy(theirs)
    finally:
        unpatch_peft()
    peft_merged = peft_merged.merge_and_unload()
    for n in TARGETS:
        assert type(getattr(merged, n)) is type(getattr(peft_merged, n))
        torch.testing.assert_close(
            quantized.dequantize_weight(getattr(merged, n)), quantized.dequantize_weight(getattr(peft_merged, n))
        )


class _count:
    """Counts calls of torch.ops.vera_ext.vera_forward while active."""

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        from vera_ext import ops

        self.ops, self.original = ops, ops.vera_forward

        def counted(*args, **kwargs):
            self.calls.append(1)
            return self.original(*args, **kwargs)

        ops.vera_forward = counted
        return self

    def __exit__(self, *exc):
        self.ops.vera_forward = self.original


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_checkpoint_on_a_4bit_base_loads_in_peft_and_back(tmp_path, direction):
    import peft

    case = CASES[0]
    ours, theirs = pair(case, init_weights=True)
    source = ours if direction == "ours_to_peft" else theirs
    set_lambdas([source])
    source.save_pretrained(tmp_path)
    fresh = quantized_mlp(case)
    if direction == "ours_to_peft":
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    else:
        loaded = VeraModel.from_pretrained(fresh, tmp_path)
    assert type(layer_of(loaded, "lin0").base_layer).__name__ == "Linear4bit"
    x = torch.randn(4, IN)
    source.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=1e-5, atol=1e-5)


def test_package_imports_and_works_without_bitsandbytes_and_torchao():
    code = """
import sys
sys.modules['bitsandbytes'] = None  # (an import of it now fails)
sys.modules['torchao'] = None
import torch
from torch import nn
import vera_ext
from vera_ext import VeraLinear, quantized
base = nn.Linear(8, 6)
assert quantized.quantization_of(base) is None and not quantized.is_quantized(base)
layer = VeraLinear(base, 4, init_weights=False)
y = layer(torch.randn(2, 8))
layer.merge(safe_merge=True)
torch.testing.assert_close(layer(torch.randn(2, 8)).shape, y.shape)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    check = "import sys, vera_ext; print('bitsandbytes' in sys.modules, 'torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr[-2000:]


def _measure():
    """The numbers the README quotes: error ratios ours/PEFT against float64, and the unmerge error."""
    print("case | worst ours/PEFT error ratio (what) | unmerge error / max|W| (lin0, lin1)")
    for case in CASES:
        errs = forward_backward_errors(case)
        what, (o, p, _) = max(errs.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-30))
        ours, _ = pair(case)
        set_lambdas([ours])
        before = {n: quantized.dequantize_weight(layer_of(ours, n).base_layer) for n in TARGETS}
        ours.merge_adapter()
        ours.unmerge_adapter()
        rel = [
            (
                (quantized.dequantize_weight(layer_of(ours, n).base_layer) - before[n]).abs().max()
                / before[n].abs().max()
            ).item()
            for n in TARGETS
        ]
        print(f"{case_id(case)} | {o / max(p, 1e-30):.3f} ({what}) | {rel[0]:.4f}, {rel[1]:.4f}")


if __name__ == "__main__":
    _measure()
