"""patch_peft(): PEFT's own VeRA layers through vera_ext's ops, with PEFT's behaviour; unpatch restores PEFT."""

import copy
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

import vera_ext.peft_patch as peft_patch
from vera_ext import ops

from vera_models import mlp, peft_model, tiny_gpt2, token_ids

PATCHED = ("forward", "merge", "unmerge", "get_delta_weight")


@pytest.fixture(autouse=True)
def _unpatched_afterwards():
    yield
    peft_patch.unpatch_peft()


def _linear_cls():
    from peft.tuners.vera.layer import Linear

    return Linear


def _run(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = _run(model, x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


CASES = [
    ("mlp_fp32", lambda: mlp(), {"target_modules": ["lin0", "lin1", "lin2"]}, lambda: torch.randn(5, 10)),
    (
        "mlp_bf16",
        lambda: mlp(dtype=torch.bfloat16),
        {"target_modules": ["lin0", "lin1"]},
        lambda: torch.randn(5, 10).bfloat16(),
    ),
    ("mlp_fp64", lambda: mlp(dtype=torch.float64), {"target_modules": ["lin1"]}, lambda: torch.randn(5, 10).double()),
    ("gpt2_conv1d", lambda: tiny_gpt2(), {"target_modules": ["c_attn"], "fan_in_fan_out": True}, lambda: token_ids()),
]


@pytest.mark.parametrize("name, builder, kwargs, inputs", CASES, ids=[c[0] for c in CASES])
def test_patched_peft_equals_peft(name, builder, kwargs, inputs):
    torch.manual_seed(3)
    pm = peft_model(builder(), r=8, init_weights=False, **kwargs)
    x = inputs()
    out0, grads0 = _outputs_and_grads(pm, x)
    peft_patch.patch_peft()
    out1, grads1 = _outputs_and_grads(pm, x)
    tol = dict(atol=1e-5, rtol=1e-4) if out0.dtype != torch.bfloat16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out1, out0, **tol)
    assert grads0.keys() == grads1.keys() and grads0
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], **tol, msg=key)


def test_patched_merge_unmerge_and_delta_weight_equal_peft():
    torch.manual_seed(3)
    pm = peft_model(tiny_gpt2(), r=8, init_weights=False, target_modules=["c_attn"], fan_in_fan_out=True)
    reference = copy.deepcopy(pm)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    ref_layer = reference.base_model.model.transformer.h[0].attn.c_attn
    peft_patch.patch_peft()
    with torch.no_grad():
        ours = layer.get_delta_weight("default")
    peft_patch.unpatch_peft()
    with torch.no_grad():
        theirs = ref_layer.get_delta_weight("default")
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    ids = token_ids()
    with torch.no_grad():
        reference.merge_adapter()
        expected = reference(ids).logits
    peft_patch.patch_peft()
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        pm.merge_adapter()
        assert layer.merged_adapters == ["default"]
        torch.testing.assert_close(layer.base_layer.weight, ref_layer.base_layer.weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pm(ids).logits, expected, atol=1e-5, rtol=1e-4)
        pm.unmerge_adapter()
    assert not layer.merged_adapters
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        layer.unmerge()


def test_patched_safe_merge_refuses_and_leaves_weight():
    pm = peft_model(mlp(), r=8, init_weights=False, target_modules=["lin0"])
    layer = pm.base_model.model.lin0
    with torch.no_grad():
        layer.vera_lambda_b["default"][0] = float("nan")
    weight = layer.base_layer.weight.detach().clone()
    peft_patch.patch_peft()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged_adapters


def test_patched_several_adapters_dropout_and_disable():
    from peft import VeraConfig

    pm = peft_model(mlp(), r=8, init_weights=False, target_modules=["lin0", "lin1"], vera_dropout=0.3)
    pm.add_adapter("other", VeraConfig(r=8, init_weights=False, target_modules=["lin1"], vera_dropout=0.2))
    pm.base_model.set_adapter(["default", "other"])
    pm.train()
    x = torch.randn(6, 10)
    torch.manual_seed(0)
    expected = pm(x)
    peft_patch.patch_peft()
    torch.manual_seed(0)
    torch.testing.assert_close(pm(x), expected)
    pm.eval()
    with pm.disable_adapter():
        out = pm(x)
    peft_patch.unpatch_peft()
    with pm.disable_adapter():
        torch.testing.assert_close(out, pm(x))


def test_patch_is_idempotent_used_and_unpatch_restores_exactly(monkeypatch):
    linear = _linear_cls()
    original = dict(vars(linear))
    peft_patch.patch_peft()
    patched = {name: vars(linear)[name] for name in PATCHED}
    peft_patch.patch_peft()
    assert peft_patch.is_peft_patched()
    assert all(vars(linear)[name] is patched[name] is not original[name] for name in PATCHED)

    calls = Counter()

    class Counting:
        def __getattr__(self, name):
            def counted(*args, **kwargs):
                calls[name] += 1
                return getattr(ops, name)(*args, **kwargs)

            return counted

    monkeypatch.setattr(peft_patch, "ops", Counting())
    pm = peft_model(mlp(), r=8, init_weights=False, target_modules=["lin0", "lin1"])
    with torch.no_grad():
        pm(torch.randn(2, 10))
        pm.merge_adapter()
        pm.unmerge_adapter()
        pm.base_model.model.lin0.get_delta_weight("default")
    assert calls == {"vera_forward": 2, "vera_merge_": 4, "vera_delta_weight": 1}

    peft_patch.unpatch_peft()
    peft_patch.unpatch_peft()
    assert not peft_patch.is_peft_patched()
    assert vars(linear).keys() == original.keys()
    assert all(vars(linear)[name] is original[name] for name in original)


@pytest.mark.slow
def test_peft_own_vera_suite_passes_with_the_patch(request):
    """PEFT 0.21.2's tests/test_vera.py and the VeRA cases of tests/test_custom_models.py (about 1 min once the
    sdist and test dependencies are cached; the first run downloads them). Runs only when asked for:
    ``pytest -m slow`` or VERA_EXT_PEFT_SUITE=1."""
    if "slow" not in (request.config.option.markexpr or "") and os.environ.get("VERA_EXT_PEFT_SUITE") != "1":
        pytest.skip("PEFT's own suite runs with `-m slow` or VERA_EXT_PEFT_SUITE=1")
    script = os.path.join(os.path.dirname(__file__), "peft_suite", "run_peft_suite.py")
    cache = os.environ.get("VERA_EXT_PEFT_SUITE_CACHE", os.path.expanduser("~/.cache/vera_ext/peft_suite"))
    start = time.time()
    result = subprocess.run([sys.executable, script, "--cache", cache], capture_output=True, text=True)
    tail = (result.stdout + result.stderr)[-3000:]
    if result.returncode != 0 and "Could not find a version" in tail:
        pytest.skip("peft 0.21.2 sdist not reachable")
    assert result.returncode == 0, tail
    assert "vera_ext patch in force: True" in result.stdout, tail
    print(f"PEFT suite with patch_peft: {time.time() - start:.0f} s")
