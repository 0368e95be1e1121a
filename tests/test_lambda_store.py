"""The λ ParameterDicts over the bank (vera_ext/lambda_store.py, docs/DESIGN.md §2.6): an adapter's Parameters are
created when something asks for them and are the same objects from then on; adding, activating, serving, saving,
counting and deleting create none; requires_grad set before creation carries over; conversions, copies and loads
keep created and not-yet-created adapters alike in step with the tables."""

import copy
import io

import pytest
import torch

from vera_ext.checkpoint import adapter_state_dict
from vera_ext.config import VeraConfig
from vera_ext.lambda_store import LambdaStore
from vera_ext.lora_export import export_lora

from vera_models import mlp, ours, token_ids, tiny_llama

TARGETS = ["lin0", "lin1"]


def _model(extra: int = 3, inference_mode: bool = False):
    vm = ours(mlp(), r=6, target_modules=TARGETS, init_weights=False)
    for i in range(extra):
        vm.add_adapter(
            f"a{i}", VeraConfig(r=6, target_modules=TARGETS, init_weights=False, inference_mode=inference_mode)
        )
    return vm


def _stores(vm):
    return [m for m in vm.modules() if isinstance(m, LambdaStore)]


def _created(vm) -> set:
    return {name for store in _stores(vm) for name in store.lambdas.created()}


def _rows(vm) -> dict:
    return {(id(s), n): s.row(n).clone() for s in _stores(vm) for n in s}


def test_adding_activating_serving_saving_counting_and_deleting_create_no_parameters(tmp_path):
    vm = _model()
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(vm, "a0").items()}
    vm.load_adapters({"b": (VeraConfig(r=6, target_modules=TARGETS), tensors)})
    vm.set_adapter("a1")
    vm.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        vm(x, adapter_indices=vm.adapter_indices(["a0", "b", "a2", "__base__"]))
        vm(x, adapter_names=["a0", "b", "a2", "__base__"])
    vm.state_dict()
    vm.save_pretrained(tmp_path, selected_adapters=["a2"])
    vm.get_nb_trainable_parameters()
    repr(vm)
    with vm.disable_adapter():
        vm(x)
    export_lora(vm, "a2", tmp_path / "lora")
    assert _created(vm) == set()
    vm.delete_adapter("a0")
    assert _created(vm) == set()
    # the active adapter's own forward creates its Parameters, and only those
    vm(x)
    assert _created(vm) == {"a1"}


def test_a_parameter_is_created_once_and_is_the_same_object_everywhere():
    vm = _model()
    layer = vm.model.lin0
    p = layer.vera_lambda_d["a1"]
    assert layer.vera_lambda_d["a1"] is p and layer.vera_lambda_d.get("a1") is p
    assert dict(vm.named_parameters())["model.lin0.vera_lambda_d.a1"] is p
    assert p.data_ptr() == layer.vera_lambda_d.row("a1").data_ptr()  # (a view of its row)
    # an optimizer step on it is a step on the table: the indexed path reads the new values
    vm.set_adapter("a1")
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(layer.vera_lambda_d.row("a1"), p.detach())
    x = torch.randn(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(vm(x, adapter_indices=vm.adapter_indices(["a1", "a1"])), vm(x))


def test_requires_grad_set_before_creation_carries_over_and_set_adapter_reaches_created_ones():
    vm = _model()
    vm.set_adapter("a1")
    store = vm.model.lin1.vera_lambda_b
    assert store.requires_grad_of("a1") and not store.requires_grad_of("a2")
    assert store["a1"].requires_grad and not store["a2"].requires_grad
    vm.set_adapter("a2")
    assert not store["a1"].requires_grad and store["a2"].requires_grad
    assert not store.requires_grad_of("a0") and not store["a0"].requires_grad
    # counting agrees with PyTorch's own count over the (now all created) Parameters
    trainable, total = vm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in vm.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in vm.parameters())


def test_counts_are_the_same_before_and_after_the_parameters_exist():
    vm = _model()
    vm.set_adapter(["a0", "a2"])
    lazy = vm.get_nb_trainable_parameters()
    assert _created(vm) == set()
    list(vm.parameters())  # creates every Parameter
    assert vm.get_nb_trainable_parameters() == lazy
    assert lazy[0] == sum(p.numel() for p in vm.parameters() if p.requires_grad)


def test_disable_adapter_restores_created_and_pending_flags():
    vm = _model()
    vm.set_adapter("a1")
    created = vm.model.lin0.vera_lambda_d["a1"]  # created and trainable; a1 of lin1 stays pending
    with vm.disable_adapter():
        assert not created.requires_grad and not vm.model.lin1.vera_lambda_d.requires_grad_of("a1")
        pending_then_created = vm.model.lin1.vera_lambda_b["a1"]  # created inside: frozen there
        assert not pending_then_created.requires_grad
    assert created.requires_grad and pending_then_created.requires_grad
    assert vm.model.lin1.vera_lambda_d.requires_grad_of("a1") and not vm.model.lin1.vera_lambda_d.requires_grad_of("a0")


def test_state_dict_gives_row_values_and_load_state_dict_writes_them_created_or_not():
    vm = _model()
    vm.model.lin0.vera_lambda_d["a0"]  # one created, the rest not
    sd = vm.state_dict()
    for store in _stores(vm):
        for name in store:
            assert any(torch.equal(v, store.row(name)) for k, v in sd.items() if k.endswith(f".{name}"))
    other = ours(mlp(seed=5), r=6, target_modules=TARGETS, init_weights=False)
    for i in range(3):
        other.add_adapter(f"a{i}", VeraConfig(r=6, target_modules=TARGETS, init_weights=False))
    other.load_state_dict(sd)
    assert _created(other) == set()  # (a plain load copies into the rows)
    for a, b in zip(_stores(vm), _stores(other)):
        for name in a:
            torch.testing.assert_close(a.row(name), b.row(name))
    # PyTorch's own checks and messages: a missing λ, a λ of the wrong shape
    bad = dict(sd)
    del bad["model.lin0.vera_lambda_d.a1"]
    bad["model.lin0.vera_lambda_b.a1"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as err:
        other.load_state_dict(bad)
    assert 'Missing key(s) in state_dict: "model.lin0.vera_lambda_d.a1"' in str(err.value)
    assert "size mismatch for model.lin0.vera_lambda_b.a1" in str(err.value)
    # assign=True replaces the Parameters: the layer points them back at the tables
    third = _model()
    third.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert all(layer._bank.linked() for layer in third.vera_layers().values())
    for a, b in zip(_stores(vm), _stores(third)):
        for name in a:
            torch.testing.assert_close(a.row(name), b.row(name))


@pytest.mark.parametrize("change", ["deepcopy", "pickle", "to_float64", "half_and_back"])
def test_copies_and_conversions_keep_created_and_pending_adapters_in_step(change):
    vm = _model()
    vm.model.lin1.vera_lambda_b["a2"]  # one created
    before = {k: v.double() for k, v in vm.state_dict().items()}
    if change == "deepcopy":
        vm = copy.deepcopy(vm)
    elif change == "pickle":
        buffer = io.BytesIO()
        torch.save(vm, buffer)
        buffer.seek(0)
        vm = torch.load(buffer, weights_only=False)
    elif change == "to_float64":
        vm = vm.to(torch.float64)
    else:
        vm = vm.half().float()
    for layer in vm.vera_layers().values():
        assert layer._bank.linked()
    after = {k: v.double() for k, v in vm.state_dict().items()}
    tol = 1e-3 if change == "half_and_back" else 0
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=tol, rtol=tol)
    # the tables and the created Parameter agree: the indexed and the named path give one answer
    x = torch.randn(3, 10, dtype=vm.model.lin0.base_layer.weight.dtype)
    with torch.no_grad():
        idx = vm.adapter_indices(["a2", "a0", "a1"])
        torch.testing.assert_close(vm(x, adapter_indices=idx), vm(x, adapter_names=["a2", "a0", "a1"]))


def test_deleting_an_adapter_leaves_its_created_parameter_its_own_values():
    vm = _model()
    p = vm.model.lin0.vera_lambda_b["a1"]
    values = p.detach().clone()
    vm.delete_adapter("a1")
    vm.add_adapter("new", VeraConfig(r=6, target_modules=TARGETS, init_weights=False))  # reuses the slot
    torch.testing.assert_close(p.detach(), values)
    assert "a1" not in vm.model.lin0.vera_lambda_b and "new" in vm.model.lin0.vera_lambda_b


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: s.__delitem__("a0"), TypeError, "delete_adapter"),
        (lambda s: s.pop("a0"), TypeError, "delete_adapter"),
        (lambda s: s.update({"a0": torch.nn.Parameter(torch.zeros(6))}), TypeError, "add_adapter"),
        (lambda s: s.__setitem__("zz", torch.nn.Parameter(torch.zeros(6))), KeyError, "not an adapter of this layer"),
        (lambda s: s.__setitem__("a0", "not a tensor"), TypeError, "must be an nn.Parameter"),
        (lambda s: s.__setitem__("a0", torch.nn.Parameter(torch.zeros(3))), ValueError, r"must have shape \(6,\)"),
        (lambda s: s._parameters.__setitem__("a0", None), TypeError, "must be a Tensor"),
    ],
)
def test_the_store_refuses_changes_that_bypass_the_layer_and_changes_nothing(call, error, match):
    vm = _model()
    store = vm.model.lin0.vera_lambda_d
    rows, keys = _rows(vm), list(store)
    with pytest.raises(error, match=match):
        call(store)
    assert list(store) == keys and _created(vm) <= {"a0"}
    for key, row in _rows(vm).items():
        torch.testing.assert_close(row, rows[key])


def test_assigning_a_parameter_to_an_adapter_links_it_to_the_row():
    vm = _model()
    layer = vm.model.lin1
    out = layer.out_features
    new = torch.nn.Parameter(torch.full((out,), 0.5))
    layer.vera_lambda_b["a1"] = new
    assert layer.vera_lambda_b["a1"] is new and new.data_ptr() == layer.vera_lambda_b.row("a1").data_ptr()
    torch.testing.assert_close(layer.vera_lambda_b.row("a1"), torch.full((out,), 0.5))
    x = torch.randn(2, 10)
    with torch.no_grad():
        idx = vm.adapter_indices(["a1", "a0"])
        torch.testing.assert_close(vm(x, adapter_indices=idx), vm(x, adapter_names=["a1", "a0"]))
    rows = _rows(vm)
    with pytest.raises(ValueError, match=rf"λ_b of adapter 'a1' must have shape \({out},\), got \(3,\)"):
        layer.vera_lambda_b["a1"] = torch.nn.Parameter(torch.zeros(3))
    assert layer.vera_lambda_b["a1"] is new
    for key, row in _rows(vm).items():
        torch.testing.assert_close(row, rows[key])
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_lambdas_requires_grad(["nope"], True)


def test_a_parameter_created_under_inference_mode_still_trains():
    vm = _model()
    vm.set_adapter("a0")
    x = torch.randn(2, 10)
    with torch.inference_mode():
        vm(x)  # creates a0's Parameters
    p = vm.model.lin0.vera_lambda_d["a0"]
    assert not p.is_inference()
    vm(x).sum().backward()
    assert p.grad is not None and torch.count_nonzero(p.grad) > 0


def test_training_one_adapter_among_many_creates_only_its_parameters_and_matches_a_fresh_model():
    """A transformers model with many adapters, one trained: the optimizer over requires_grad parameters holds
    only that adapter's λ, and its loss curve is the one of a model that has that adapter alone."""
    many = ours(tiny_llama(), r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    alone = copy.deepcopy(many)
    for i in range(20):
        many.add_adapter(f"x{i}", VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    losses = []
    for vm in (many, alone):
        vm.train()
        params = [p for p in vm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        ids = token_ids()
        run = []
        for _ in range(3):
            loss = vm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
        assert {n.rsplit(".", 1)[-1] for n, p in vm.named_parameters() if p.requires_grad} == {"default"}
    torch.testing.assert_close(losses[0], losses[1])


def test_functional_call_swaps_the_lambdas_and_leaves_the_store_as_it_was():
    vm = _model()
    x = torch.randn(3, 10)
    doubled = {k: v.detach() * 2 for k, v in vm.named_parameters() if "vera_lambda" in k}
    before = {k: v.detach().clone() for k, v in vm.state_dict().items()}
    out = torch.func.functional_call(vm, doubled, (x,))
    after = vm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        for name, p in vm.named_parameters():
            if name in doubled:
                p.copy_(doubled[name])
    torch.testing.assert_close(out, vm(x))
