"""Model-level VeRA against PEFT 0.21.2: target matching, shared projection, trainability, adapter lifecycle,
merging, and real transformers models (outputs and gradients)."""

import warnings

import pytest
import torch
from torch import nn

from vera_ext.config import VeraConfig
from vera_ext.layer import VeraLinear
from vera_ext.model import VeraModel, get_vera_model
from vera_ext.projection import generate_projection

from vera_models import (
    Blocks,
    assert_unchanged,
    custom_mlp,
    mlp,
    ours,
    peft_model,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    twins,
)


def ours_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.")


def trainable(model, strip=""):
    return sorted(n.removeprefix(strip) for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ config


def test_config_fields_and_defaults_are_peft_ones():
    from peft import VeraConfig as PeftVeraConfig

    theirs = PeftVeraConfig().to_dict()
    mine = VeraConfig().to_dict()
    assert set(mine) == set(theirs)
    for key in set(mine) - {"peft_version", "peft_type"}:
        assert mine[key] == theirs[key], key
    assert mine["peft_type"] == "VERA"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be an int >= 1"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"vera_dropout": 1.0}, r"vera_dropout must be a float in \[0, 1\)"),
        ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be"),
        ({"target_modules": 3}, "target_modules must be None or a str or a list of str"),
        ({"task_type": "CLASSIFY"}, "task_type must be None or one of"),
        ({"peft_type": "LORA"}, "peft_type must be 'VERA'"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VeraConfig(**kwargs)


def test_peft_config_object_is_accepted():
    from peft import VeraConfig as PeftVeraConfig

    vm = get_vera_model(mlp(), PeftVeraConfig(r=4, target_modules=["lin0"]))
    assert isinstance(vm.peft_config["default"], VeraConfig)
    assert vm.targeted_module_names == ["lin0"]


# ------------------------------------------------------------------------------------------------ injection


MATCHING = [
    (mlp, {"target_modules": ["lin0", "lin2"]}),
    (mlp, {"target_modules": "lin[12]"}),
    (mlp, {"target_modules": ".*lin.*"}),
    (mlp, {"target_modules": "all-linear"}),
    (mlp, {"target_modules": ["lin0", "lin1"], "modules_to_save": ["head"]}),
    (lambda: Blocks(), {"target_modules": ["proj"], "layers_to_transform": [0, 2]}),
    (lambda: Blocks(), {"target_modules": ["proj"], "layers_to_transform": 1, "layers_pattern": "h"}),
    (lambda: Blocks(), {"target_modules": ["proj"], "layers_to_transform": [1], "layers_pattern": ["layers", "h"]}),
]


@pytest.mark.parametrize("builder, kwargs", MATCHING)
def test_targets_projection_and_counts_match_peft(builder, kwargs):
    torch.manual_seed(0)
    a, b = twins(builder)
    kwargs = dict(kwargs, r=4, init_weights=False)
    torch.manual_seed(5)
    vm = ours(a, **kwargs)
    torch.manual_seed(5)
    pm = peft_model(b, **kwargs)
    assert sorted(vm.targeted_module_names) == sorted(pm.base_model.targeted_module_names)
    assert torch.equal(vm.vera_A["default"], pm.base_model.vera_A["default"])
    assert torch.equal(vm.vera_B["default"], pm.base_model.vera_B["default"])
    assert vm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert trainable(vm) == trainable(pm, "base_model.")
    x = torch.randn(4, 10 if builder is mlp else 8)
    torch.testing.assert_close(vm(x), pm(x))


def test_projection_is_sized_to_largest_matched_layer_and_bit_identical_to_the_key():
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1", "lin2"], projection_prng_key=11)
    A, B = generate_projection(8, 24, 24, prng_key=11)
    assert torch.equal(vm.vera_A["default"], A) and torch.equal(vm.vera_B["default"], B)
    layers = vm.vera_layers()
    assert all(layer.vera_projection is vm.vera_projection for layer in layers.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_gets_peft_rounded_projection_and_lambdas(dtype):
    a, b = twins(mlp, dtype=dtype)
    torch.manual_seed(2)
    vm = ours(a, r=4, target_modules=["lin0", "lin1"], init_weights=False)
    torch.manual_seed(2)
    pm = peft_model(b, r=4, target_modules=["lin0", "lin1"], init_weights=False)
    assert vm.vera_A["default"].dtype == torch.float32
    assert torch.equal(vm.vera_A["default"], pm.base_model.vera_A["default"])
    assert torch.equal(vm.vera_B["default"], pm.base_model.vera_B["default"])
    for n, p in pm.named_parameters():
        if "vera_lambda" in n:
            assert torch.equal(dict(vm.named_parameters())[ours_name(n)], p), n
    x = torch.randn(3, 10, dtype=dtype)
    out = vm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, pm(x), atol=2e-2, rtol=2e-2)


def test_generic_in_out_module_gets_adapter_added_to_its_output():
    model = custom_mlp()
    x = torch.randn(4, 6)
    base_inp = model.inp(x).detach()
    vm = ours(model, r=4, target_modules=["inp"], init_weights=False)
    layer = vm.model.inp
    assert isinstance(layer, VeraLinear) and not layer.base_layer.weight.requires_grad
    A, B = vm.vera_A["default"][:4, :6], vm.vera_B["default"][:12, :4]
    ld, lb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    torch.testing.assert_close(layer(x), base_inp + lb * (((x @ A.T) * ld) @ B.T))
    with pytest.raises(TypeError, match="only nn.Linear and Conv1D"):
        vm.merge_adapter()


def test_conv1d_fan_in_fan_out_warnings_as_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        vm = get_vera_model(tiny_gpt2(), VeraConfig(r=4, target_modules=["c_attn"]))
    assert vm.peft_config["default"].fan_in_fan_out is True
    assert all(layer.fan_in_fan_out for layer in vm.vera_layers().values())
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        vm = get_vera_model(mlp(), VeraConfig(r=4, target_modules=["lin0"], fan_in_fan_out=True))
    assert vm.peft_config["default"].fan_in_fan_out is False


@pytest.mark.parametrize("bias", ["none", "all", "vera_only"])
def test_bias_modes_train_what_peft_trains(bias):
    a, b = twins(mlp)
    vm = ours(a, r=4, target_modules=["lin0", "lin1"], bias=bias, modules_to_save=["head"])
    pm = peft_model(b, r=4, target_modules=["lin0", "lin1"], bias=bias, modules_to_save=["head"])
    assert trainable(vm) == trainable(pm, "base_model.")
    assert vm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_print_trainable_parameters_matches_peft(capsys):
    a, b = twins(tiny_llama)
    ours(a, r=8, target_modules=["q_proj", "v_proj"]).print_trainable_parameters()
    peft_model(b, r=8, target_modules=["q_proj", "v_proj"]).print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.strip().splitlines()
    assert mine == theirs


# ------------------------------------------------------------------------------------------------ real models


def _lambda_grads(model, strip=""):
    return {n.removeprefix(strip): p.grad for n, p in model.named_parameters() if "vera_lambda" in n}


@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_real_models_outputs_and_gradients_equal_peft(builder, targets):
    a, b = twins(builder)
    kwargs = dict(r=16, target_modules=targets, init_weights=False)
    torch.manual_seed(7)
    vm = ours(a, **kwargs)
    torch.manual_seed(7)
    pm = peft_model(b, **kwargs)
    ids = token_ids()
    out_vm, out_pm = vm(input_ids=ids, labels=ids), pm(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_vm.logits, out_pm.logits, atol=1e-5, rtol=1e-4)
    out_vm.loss.backward()
    out_pm.loss.backward()
    g_vm, g_pm = _lambda_grads(vm), _lambda_grads(pm, "base_model.")
    assert g_vm.keys() == g_pm.keys() and len(g_vm) == 4 * len(targets)
    for name in g_vm:
        torch.testing.assert_close(g_vm[name], g_pm[name], atol=1e-6, rtol=1e-4, msg=name)
    # merged models agree too
    merged = vm.merge_and_unload()
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, pm.merge_and_unload()(ids).logits, atol=1e-5, rtol=1e-4)


def test_bf16_llama_matches_peft():
    a, b = twins(tiny_llama, dtype=torch.bfloat16)
    torch.manual_seed(7)
    vm = ours(a, r=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    torch.manual_seed(7)
    pm = peft_model(b, r=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(vm(ids).logits.float(), pm(ids).logits.float(), atol=3e-2, rtol=3e-2)


def test_attribute_access_reaches_the_wrapped_model():
    vm = ours(tiny_llama(), r=4, target_modules=["q_proj"])
    assert vm.config.model_type == "llama"
    assert vm.get_base_model() is vm.model
    assert vm.get_input_embeddings() is vm.model.model.embed_tokens


# ------------------------------------------------------------------------------------------------ add_adapter checks


def _two_adapter_model():
    vm = ours(mlp(), r=4, target_modules=["lin0", "lin1"], init_weights=False)
    return vm


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        (
            "other",
            {"target_modules": ["lin0"], "projection_prng_key": 123},
            ValueError,
            "Vera PRNG initialisation key must be the same for all adapters. Got config.projection_prng_key=123",
        ),
        (
            "other",
            {"target_modules": ["lin0"], "save_projection": False},
            ValueError,
            "must be saved for all adapters or none",
        ),
        ("other", {"target_modules": ["lin2"], "r": 4}, ValueError, "vera_B has a size of 24 but 20|vera_A has a size"),
        ("other", {"target_modules": ["lin0"], "r": 8}, ValueError, "vera_A has a size of 4 but 8 or greater"),
        ("other", {"target_modules": ["nope"]}, ValueError, r"Target modules \{'nope'\} not found in the base model"),
        ("other", {"target_modules": "lin.*|layers"}, None, None),
        ("default", {"target_modules": ["lin0"]}, ValueError, "Adapter with name 'default' already exists"),
        ("__base__", {"target_modules": ["lin0"]}, ValueError, "reserved"),
        ("other", {"target_modules": ["lin0"], "modules_to_save": ["lin0"]}, ValueError, "not found|modules_to_save"),
    ],
)
def test_refused_add_adapter_changes_nothing(name, kwargs, error, match):
    vm = _two_adapter_model()
    before = snapshot(vm)
    config_before = dict(vm.peft_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if error is None:  # lin2 (24 in) is larger than the projection (20 in): refused as well
            error, match = ValueError, "vera_A has a size of 20 but 24 or greater is required"
        with pytest.raises(error, match=match):
            vm.add_adapter(name, VeraConfig(**dict({"r": 4}, **kwargs)))
    assert_unchanged(vm, before)
    assert vm.peft_config == config_before


def test_second_adapter_with_bias_is_refused():
    vm = ours(mlp(), r=4, target_modules=["lin0"], bias="all")
    before = snapshot(vm)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        vm.add_adapter("other", VeraConfig(r=4, target_modules=["lin0"], bias="vera_only"))
    assert_unchanged(vm, before)


def test_unsupported_target_is_a_type_error_and_changes_nothing():
    model = Blocks()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"Target module body\.layers\.0 \(ModuleDict\) is not supported"):
        get_vera_model(model, VeraConfig(r=4, target_modules=r"body\.layers\.\d"))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="No layers types compatible with VeRA were found"):
        get_vera_model(model, VeraConfig(r=4, target_modules=["missing"]))
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ lifecycle


def test_adapter_lifecycle_matches_peft():
    a, b = twins(mlp)
    torch.manual_seed(1)
    vm = ours(a, r=4, target_modules=["lin0", "lin1"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=4, target_modules=["lin1"], init_weights=False))
    torch.manual_seed(1)
    pm = peft_model(b, r=4, target_modules=["lin0", "lin1"], init_weights=False)
    from peft import VeraConfig as PeftVeraConfig

    pm.add_adapter("other", PeftVeraConfig(r=4, target_modules=["lin1"], init_weights=False))
    x = torch.randn(5, 10)
    for step in ("default", "other", ["default", "other"]):
        vm.set_adapter(step)
        pm.base_model.set_adapter(step)
        assert vm.active_adapters == pm.base_model.active_adapters
        assert trainable(vm) == trainable(pm, "base_model.")
        torch.testing.assert_close(vm(x), pm(x))
    base = vm.model.lin2(torch.relu(vm.model.lin1.base_layer(torch.relu(vm.model.lin0.base_layer(x)))))
    with vm.disable_adapter():
        assert trainable(vm) == []
        torch.testing.assert_close(vm(x), vm.model.head(torch.relu(base)))
    assert trainable(vm) == trainable(pm, "base_model.")
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter"):
        vm.set_adapter("default")
        vm.delete_adapter("default")
    assert vm.active_adapters == ["other"] and list(vm.peft_config) == ["other"]
    assert "default" not in vm.model.lin1.vera_lambda_d and not vm.model.lin0.vera_lambda_d
    with pytest.raises(ValueError, match="Adapter default does not exist"):
        vm.delete_adapter("default")
    with pytest.raises(ValueError, match="Adapter nope not found"):
        vm.set_adapter("nope")


def test_merge_unmerge_and_unload():
    vm = ours(mlp(), r=4, target_modules=["lin0", "lin1", "lin2"], init_weights=False)
    x = torch.randn(5, 10)
    expected = vm(x).detach()
    weights = {n: l.base_layer.weight.detach().clone() for n, l in vm.vera_layers().items()}
    vm.merge_adapter()
    assert all(l.merged for l in vm.vera_layers().values())
    torch.testing.assert_close(vm(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="while they are merged"):
        vm.delete_adapter("default")
    vm.unmerge_adapter()
    for n, l in vm.vera_layers().items():
        torch.testing.assert_close(l.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="Already unmerged"):
        vm.unmerge_adapter()
    merged = vm.merge_and_unload()
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    assert type(merged.lin0) is nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_unload_returns_the_base_model_and_modules_to_save_copy():
    model = mlp()
    x = torch.randn(2, 10)
    base_out = model(x).detach()
    vm = ours(model, r=4, target_modules=["lin0"], init_weights=False, modules_to_save=["head"])
    with torch.no_grad():
        vm.model.head.modules_to_save["default"].bias.add_(1.0)
    unloaded = vm.unload()
    assert type(unloaded.lin0) is nn.Linear and type(unloaded.head) is nn.Linear
    torch.testing.assert_close(unloaded(x), base_out + 1.0)


def test_safe_merge_refusal_leaves_every_weight_unchanged():
    vm = ours(mlp(), r=4, target_modules=["lin0", "lin1", "lin2"], init_weights=False)
    with torch.no_grad():
        vm.model.lin2.vera_lambda_b["default"][0] = float("inf")
    before = snapshot(vm)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        vm.merge_adapter(safe_merge=True)
    assert_unchanged(vm, before)
    assert not any(l.merged for l in vm.vera_layers().values())


def test_lower_rank_second_adapter_works():
    # PEFT 0.21.2 accepts a second adapter of lower rank but then fails in forward; vera_ext runs it.
    vm = ours(mlp(), r=8, target_modules=["lin0"], init_weights=False)
    vm.add_adapter("small", VeraConfig(r=3, target_modules=["lin0"], init_weights=False))
    vm.set_adapter("small")
    layer = vm.model.lin0
    x = torch.randn(2, 10)
    A, B = vm.vera_A["small"][:3, :10], vm.vera_B["small"][:20, :3]
    ld, lb = layer.vera_lambda_d["small"], layer.vera_lambda_b["small"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + lb * (((x @ A.T) * ld) @ B.T))


def test_from_existing_vera_model_is_refused():
    vm = ours(mlp(), r=4, target_modules=["lin0"])
    with pytest.raises(ValueError, match="already holds VeRA layers"):
        VeraModel(vm.model, VeraConfig(r=4, target_modules=["lin1"]))
