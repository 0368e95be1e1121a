"""Checkpoints in PEFT 0.21.2's directory format: PEFT writes and we read, we write and PEFT reads (compared by
outputs), several adapters, save_projection=False, and refused loads that leave the model unchanged."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from vera_ext.config import VeraConfig
from vera_ext.model import VeraModel
from vera_ext.projection import generate_projection

from vera_models import (
    assert_unchanged,
    mlp,
    ours,
    peft_model,
    randomize_lambdas,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

SCENARIOS = {
    "llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    "gpt2_vera_only_bias": (tiny_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "vera_only"}),
    "mlp_all_bias": (mlp, {"target_modules": ["lin0", "lin1"], "bias": "all"}),
    "mlp_no_projection": (mlp, {"target_modules": ["lin0", "lin1"], "save_projection": False}),
}


def _inputs(builder):
    return token_ids() if builder in (tiny_llama, tiny_gpt2) else torch.randn(4, 10)


def _run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _train_a_little(model, seed=4):
    """Move every trainable tensor (lambdas, biases, modules_to_save copies) away from its initial value."""
    randomize_lambdas(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and "vera_lambda" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_peft_writes_we_read(scenario, tmp_path):
    builder, kwargs = SCENARIOS[scenario]
    pm = peft_model(builder(), r=8, **kwargs)
    _train_a_little(pm)
    x = _inputs(builder)
    expected = _run(pm, x)
    pm.save_pretrained(tmp_path)
    vm = _quiet(VeraModel.from_pretrained, builder(), tmp_path)
    torch.testing.assert_close(_run(vm, x), expected)
    # loaded for inference: the adapter's own weights are frozen (bias modes keep biases trainable, as in PEFT)
    adapter_weights = sum(
        p.numel()
        for n, p in pm.named_parameters()
        if p.requires_grad and ("vera_lambda" in n or "modules_to_save" in n)
    )
    assert not vm.training
    assert vm.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0] - adapter_weights


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_we_write_peft_reads(scenario, tmp_path):
    from peft import PeftModel

    builder, kwargs = SCENARIOS[scenario]
    vm = ours(builder(), r=8, **kwargs)
    _train_a_little(vm)
    x = _inputs(builder)
    expected = _run(vm, x)
    vm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["inference_mode"] is True
    pm = _quiet(PeftModel.from_pretrained, builder(), tmp_path)
    torch.testing.assert_close(_run(pm, x), expected)
    # and the files hold exactly the keys PEFT writes for the same adapter
    reference = peft_model(builder(), r=8, **kwargs)
    reference.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )


def test_several_adapters_both_ways(tmp_path):
    from peft import PeftModel

    x = torch.randn(4, 10)
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=8, target_modules=["lin1"], init_weights=False))
    randomize_lambdas(vm)
    outputs = {}
    for name in ("default", "other"):
        vm.set_adapter(name)
        outputs[name] = _run(vm, x)
    vm.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "other" / "adapter_config.json").exists()

    pm = _quiet(PeftModel.from_pretrained, mlp(), tmp_path / "ours")
    _quiet(pm.load_adapter, tmp_path / "ours" / "other", "other")
    for name in ("default", "other"):
        pm.set_adapter(name)
        torch.testing.assert_close(_run(pm, x), outputs[name])

    pm.save_pretrained(tmp_path / "peft")
    back = _quiet(VeraModel.from_pretrained, mlp(), tmp_path / "peft")
    _quiet(back.load_adapter, tmp_path / "peft" / "other", "other")
    for name in ("default", "other"):
        back.set_adapter(name)
        torch.testing.assert_close(_run(back, x), outputs[name])


def test_save_projection_false_regenerates_bit_identical_projection(tmp_path):
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"], save_projection=False, projection_prng_key=9)
    randomize_lambdas(vm)
    vm.save_pretrained(tmp_path)
    assert not any("vera_A" in k or "vera_B" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="relying on PRNG initialisation"):
        loaded = VeraModel.from_pretrained(mlp(), tmp_path)
    A, B = generate_projection(8, 20, 24, prng_key=9)
    assert torch.equal(loaded.vera_A["default"], A) and torch.equal(loaded.vera_B["default"], B)
    x = torch.randn(3, 10)
    torch.testing.assert_close(_run(loaded, x), _run(vm, x))


def test_saved_projection_is_restored_not_regenerated(tmp_path):
    pm = peft_model(mlp(), r=8, target_modules=["lin0", "lin1"], init_weights=False)
    with torch.no_grad():
        pm.base_model.vera_A["default"] += 1.0
        pm.base_model.vera_B["default"] -= 0.5
    pm.save_pretrained(tmp_path)
    vm = VeraModel.from_pretrained(mlp(), tmp_path)
    assert torch.equal(vm.vera_A["default"], pm.base_model.vera_A["default"])
    assert torch.equal(vm.vera_B["default"], pm.base_model.vera_B["default"])
    x = torch.randn(3, 10)
    torch.testing.assert_close(_run(vm, x), _run(pm, x))


def test_load_adapter_trainable_and_inactive(tmp_path):
    vm = ours(mlp(), r=8, target_modules=["lin0"])
    vm.save_pretrained(tmp_path)
    vm.load_adapter(tmp_path, "second", is_trainable=True)
    assert vm.active_adapters == ["default"]
    assert vm.model.lin0.vera_lambda_d["second"].requires_grad
    vm.load_adapter(tmp_path, "third")
    assert not vm.model.lin0.vera_lambda_d["third"].requires_grad
    trainable = VeraModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert trainable.model.lin0.vera_lambda_d["default"].requires_grad and trainable.training
    frozen = VeraModel.from_pretrained(mlp(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training


# ------------------------------------------------------------------------------------------------ refused loads


@pytest.fixture
def saved_mlp(tmp_path):
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"], modules_to_save=["head"])
    randomize_lambdas(vm)
    vm.save_pretrained(tmp_path / "good")
    return tmp_path


def _edit_checkpoint(src, dst, edit):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


BAD_EDITS = {
    "missing": (lambda t: t.pop("base_model.model.lin1.vera_lambda_d"), "1 missing key.*lin1.vera_lambda_d"),
    "extra": (lambda t: t.__setitem__("base_model.model.lin2.vera_lambda_b", torch.zeros(20)), "1 unexpected key"),
    "shape": (
        lambda t: t.__setitem__("base_model.model.lin0.vera_lambda_b", torch.zeros(7)),
        r"wrong shape.*lin0.vera_lambda_b: checkpoint \(7,\), model \(20,\)",
    ),
    "projection_shape": (
        lambda t: t.__setitem__("base_model.vera_A", torch.zeros(8, 30)),
        r"wrong shape.*base_model.vera_A: checkpoint \(8, 30\), model \(8, 20\)",
    ),
    "no_projection": (lambda t: t.pop("base_model.vera_B"), "vera_A and vera_B .* were not present"),
    "modules_to_save": (lambda t: t.pop("base_model.model.head.bias"), "missing key.*head.bias"),
}


@pytest.mark.parametrize("bad", list(BAD_EDITS))
def test_bad_checkpoint_is_refused_and_model_unchanged(bad, saved_mlp):
    edit, match = BAD_EDITS[bad]
    path = _edit_checkpoint(saved_mlp / "good", saved_mlp / bad, edit)
    fresh = mlp()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        VeraModel.from_pretrained(fresh, path)
    assert_unchanged(fresh, before)
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"])
    before = snapshot(vm)
    with pytest.raises(ValueError, match=match):
        vm.load_adapter(path, "loaded")
    assert_unchanged(vm, before)
    assert list(vm.peft_config) == ["default"]


def test_wrong_architecture_is_refused_and_model_unchanged(tmp_path):
    vm = ours(tiny_llama(), r=8, target_modules=["q_proj", "v_proj"])
    vm.save_pretrained(tmp_path)
    gpt2 = tiny_gpt2()
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match="No layers types compatible with VeRA were found"):
        VeraModel.from_pretrained(gpt2, tmp_path)
    assert_unchanged(gpt2, before)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = snapshot(wider)
    with pytest.raises(ValueError, match="wrong shape"):
        VeraModel.from_pretrained(wider, tmp_path)
    assert_unchanged(wider, before)


def test_load_adapter_with_a_different_projection_is_refused(tmp_path):
    other = ours(mlp(), r=8, target_modules=["lin0", "lin1"])
    with torch.no_grad():
        other.vera_projection.vera_A.mul_(2)
    other.save_pretrained(tmp_path)
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"])
    before = snapshot(vm)
    with pytest.raises(ValueError, match="differs from this model's shared projection"):
        vm.load_adapter(tmp_path, "other")
    assert_unchanged(vm, before)
    # Into the existing adapter (PEFT overwrites its weights in place; Trainer's resume does this): refused too.
    with pytest.raises(ValueError, match="differs from this model's shared projection"):
        vm.load_adapter(tmp_path, "default")
    assert_unchanged(vm, before)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VeraModel.from_pretrained(mlp(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        VeraModel.from_pretrained(mlp(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type must be 'VERA'"):
        VeraModel.from_pretrained(mlp(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(VeraConfig(r=8, target_modules=["lin0"]).to_dict()))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        VeraModel.from_pretrained(mlp(), tmp_path)
