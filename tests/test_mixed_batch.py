"""Mixed-adapter batches: one adapter name per sample, one pass. Equal to running each sample alone with its
adapter; gradients reach only the adapters used; clear errors."""

import pytest
import torch

from vera_ext.config import VeraConfig

from vera_models import mlp, ours, randomize_lambdas, snapshot, assert_unchanged, tiny_llama, token_ids


def _three_adapters(**kwargs):
    vm = ours(mlp(), r=6, target_modules=["lin0", "lin1"], init_weights=False, **kwargs)
    vm.add_adapter("b", VeraConfig(r=6, target_modules=["lin0", "lin1"], init_weights=False))
    vm.add_adapter("c", VeraConfig(r=4, target_modules=["lin1"], init_weights=False))  # lin0 lacks "c"
    randomize_lambdas(vm)
    return vm


def _alone(vm, x, name):
    """One sample run the ordinary way: its adapter active, or adapters disabled for "__base__"."""
    if name == "__base__":
        with vm.disable_adapter():
            return vm(x)
    vm.set_adapter(name)
    return vm(x)


def test_mixed_batch_equals_each_sample_alone():
    vm = _three_adapters()
    x = torch.randn(6, 10)
    names = ["default", "__base__", "b", "c", "default", "b"]
    with torch.no_grad():
        mixed = vm(x, adapter_names=names)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i : i + 1], _alone(vm, x[i : i + 1], name), msg=name)


def test_mixed_batch_3d_inputs_on_a_real_model():
    vm = ours(tiny_llama(), r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=8, target_modules=["q_proj"], init_weights=False))
    randomize_lambdas(vm)
    ids = token_ids(batch=3, seq=7)
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        mixed = vm(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i : i + 1], _alone(vm, ids[i : i + 1], name).logits, msg=name)


def test_generate_with_adapter_names_matches_per_sample_generation():
    vm = ours(tiny_llama(), r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False))
    randomize_lambdas(vm, seed=11)
    ids = token_ids(batch=2, seq=5)
    mask = torch.ones_like(ids)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    mixed = vm.generate(input_ids=ids, attention_mask=mask, adapter_names=["other", "default"], **settings)
    for i, name in enumerate(["other", "default"]):
        vm.set_adapter(name)
        alone = vm.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **settings)
        assert torch.equal(mixed[i : i + 1], alone)


def test_gradients_reach_only_the_adapters_used():
    vm = _three_adapters()
    vm.train()
    for p in vm.parameters():
        p.requires_grad_(False)
    lambdas = {n: p for n, p in vm.named_parameters() if "vera_lambda" in n}
    for p in lambdas.values():
        p.requires_grad_(True)
    x = torch.randn(4, 10)
    names = ["default", "__base__", "default", "c"]
    vm(x, adapter_names=names).square().sum().backward()
    for n, p in lambdas.items():
        used = n.endswith(".default") or (n.endswith(".c") and ".lin1." in n)
        assert (p.grad is not None and p.grad.abs().sum() > 0) == used, n
    # and the gradient of "default" is the one its rows alone produce
    expected = {n: p.grad.clone() for n, p in lambdas.items() if n.endswith(".default")}
    vm.zero_grad(set_to_none=True)
    vm(x[[0, 2]], adapter_names=["default", "default"]).square().sum().backward()
    for n, g in expected.items():
        torch.testing.assert_close(lambdas[n].grad, g, msg=n)


def test_modules_to_save_follow_the_sample_adapter():
    vm = ours(mlp(), r=6, target_modules=["lin0"], init_weights=False, modules_to_save=["head"])
    vm.add_adapter("b", VeraConfig(r=6, target_modules=["lin0"], init_weights=False))
    with torch.no_grad():
        vm.model.head.modules_to_save["default"].bias.add_(5.0)
    x = torch.randn(3, 10)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        mixed = vm(x, adapter_names=names)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i : i + 1], _alone(vm, x[i : i + 1], name), msg=name)


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["default", "zzz", "b", "yyy"], ValueError, "Trying to infer with non-existing adapter\\(s\\): yyy, zzz"),
        (
            ["default", "b"],
            ValueError,
            "Length of `adapter_names` should be the same as the number of inputs, but got 2 and 4",
        ),
        ("default", TypeError, "adapter_names must be a list of str"),
        (["default", 3, "b", "b"], TypeError, "adapter_names must be a list of str"),
    ],
)
def test_bad_adapter_names_are_clear_errors(names, error, match):
    vm = _three_adapters()
    x = torch.randn(4, 10)
    before, out = snapshot(vm), vm(x).detach()
    with pytest.raises(error, match=match):
        vm(x, adapter_names=names)
    assert_unchanged(vm, before)
    torch.testing.assert_close(vm(x), out)  # no hook left behind


def test_mixed_batch_refused_while_merged():
    vm = _three_adapters()
    vm.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        vm(torch.randn(2, 10), adapter_names=["default", "b"])


def test_mixed_batch_training_with_gradient_checkpointing_is_refused():
    vm = ours(tiny_llama(), r=8, target_modules=["q_proj"], init_weights=False)
    enable = getattr(vm.model, "activation_checkpointing_enable", None) or vm.model.gradient_checkpointing_enable
    enable()
    vm.train()
    with pytest.raises(ValueError, match="cannot be trained with gradient checkpointing"):
        vm(input_ids=token_ids(batch=2), adapter_names=["default", "__base__"])
