"""Meta-device init: build + inject on "meta", then vera_ext.materialize gives the model eager init gives."""

import pytest
import torch
from torch import nn

import vera_ext
from vera_models import mlp, ours, randomize_lambdas, tiny_gpt2, token_ids

MLP_TARGETS = dict(r=8, target_modules=["lin0", "lin1", "lin2"], modules_to_save=["head"])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_projection(a, b) -> None:
    # compared directly: with save_projection=False the buffers are not in the state dict
    assert torch.equal(a.vera_projection.vera_A, b.vera_projection.vera_A)
    assert torch.equal(a.vera_projection.vera_B, b.vera_projection.vera_B)


def meta_twin(builder, dtype, **config):
    """(eager VeraModel, the same built and injected on meta then materialized from the base state dict)."""
    eager = ours(builder(dtype=dtype), **config)
    base_state = builder(dtype=dtype).state_dict()
    with torch.device("meta"):
        lazy = ours(builder(dtype=dtype), **config)
    assert lazy.vera_projection.vera_A.is_meta and all(p.is_meta for p in lazy.parameters())
    assert vera_ext.materialize(lazy, "cpu", base_state_dict=base_state) is lazy
    return eager, lazy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_projection", [True, False])
def test_mlp_meta_init_equals_eager_init(dtype, save_projection):
    eager, lazy = meta_twin(mlp, dtype, save_projection=save_projection, **MLP_TARGETS)
    assert_same_state(eager, lazy)
    assert_same_projection(eager, lazy)
    # init_weights=True starts at lambda_b = 0, where A/B do not show in outputs: train-like lambdas make them count
    randomize_lambdas(eager)
    randomize_lambdas(lazy)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert torch.equal(eager(x), lazy(x))


def test_random_lambda_init_equals_eager_from_the_same_rng_state():
    config = dict(MLP_TARGETS, init_weights=False)
    base_state = mlp().state_dict()
    base = mlp()
    torch.manual_seed(11)
    eager = ours(base, **config)
    with torch.device("meta"):
        lazy = ours(mlp(), **config)
    torch.manual_seed(11)
    vera_ext.materialize(lazy, "cpu", base_state_dict=base_state)
    assert_same_state(eager, lazy)
    assert not torch.equal(lazy.model.lin0.vera_lambda_b["default"], torch.zeros(20))  # really non-trivial
    x = torch.randn(3, 10)
    assert torch.equal(eager(x), lazy(x))


def test_gpt2_conv1d_meta_init_equals_eager_init():
    config = dict(r=8, target_modules=["c_attn", "c_fc"], save_projection=False)
    eager, lazy = meta_twin(tiny_gpt2, torch.float32, **config)
    assert_same_state(eager, lazy)
    assert_same_projection(eager, lazy)
    randomize_lambdas(eager)
    randomize_lambdas(lazy)
    ids = token_ids()
    assert torch.equal(eager(ids).logits, lazy(ids).logits)


def test_second_adapter_and_standalone_layer():
    eager = ours(mlp(), **MLP_TARGETS)
    eager.add_adapter("other", vera_ext.VeraConfig(r=4, target_modules=["lin1"], d_initial=0.5))
    with torch.device("meta"):
        lazy = ours(mlp(), **MLP_TARGETS)
        lazy.add_adapter("other", vera_ext.VeraConfig(r=4, target_modules=["lin1"], d_initial=0.5))
    vera_ext.materialize(lazy, "cpu", base_state_dict=mlp().state_dict())
    assert_same_state(eager, lazy)
    assert torch.equal(lazy.model.lin1.vera_lambda_d["other"], torch.full((4,), 0.5))

    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = vera_ext.VeraLinear(base, r=3, init_weights=False)
    with torch.device("meta"):
        lazy_layer = vera_ext.VeraLinear(nn.Linear(6, 5), r=3, init_weights=False)
    with torch.no_grad():
        layer.vera_lambda_d["default"].fill_(0.7)  # trained values come from a checkpoint afterwards
    vera_ext.materialize(lazy_layer, "cpu", base_state_dict=base.state_dict())
    lazy_layer.load_state_dict(layer.state_dict())
    assert torch.equal(lazy_layer.vera_projection.vera_A, layer.vera_projection.vera_A)
    x = torch.randn(2, 6)
    assert torch.equal(layer(x), lazy_layer(x))


def test_materialize_refuses_what_it_cannot_do():
    with torch.device("meta"):
        lazy = ours(mlp(), **MLP_TARGETS)
    state = mlp().state_dict()
    del state["lin1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['lin1.weight'\].*unexpected \['extra.weight'\]"):
        vera_ext.materialize(lazy, "cpu", base_state_dict=state)
    bad = mlp().state_dict()
    bad["lin1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lin1.weight.*shape"):
        vera_ext.materialize(lazy, "cpu", base_state_dict=bad)

    given = vera_ext.VeraProjection(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="not from a PRNG key"):
        given.regenerate_()
    with torch.device("meta"):
        on_meta = vera_ext.VeraProjection.from_key(2, 3, 4)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        on_meta.regenerate_()


def test_base_key_maps_injected_paths_back():
    from vera_ext.meta_init import base_key

    assert base_key("model.lin0.base_layer.weight") == "model.lin0.weight"
    assert base_key("head.modules_to_save.default.bias") == "head.bias"
    assert base_key("head.original_module.weight") == "head.weight"
    assert base_key("lin0.vera_lambda_b.default") is None
    assert base_key("lin0.vera_projection.vera_A") is None


def test_forward_on_meta_gives_shapes():
    """A model still on the meta device runs its forward for shapes (as nn.Linear does), in every forward path:
    one adapter, two summed adapters, a mixed batch, and a Conv1D base."""
    with torch.device("meta"):
        layer = vera_ext.VeraLinear(nn.Linear(10, 6), 4)
        layer.update_layer("b", 4)
    x = torch.empty(2, 3, 10, device="meta")
    assert layer(x).shape == (2, 3, 6) and layer(x).is_meta
    layer.set_adapter(["default", "b"])
    assert layer(x).shape == (2, 3, 6)
    assert layer(x, adapter_names=["b", "__base__"]).shape == (2, 3, 6)

    with torch.device("meta"):
        model = ours(mlp(), **MLP_TARGETS)
    assert model(torch.empty(5, 10, device="meta")).shape == (5, 3)
    with torch.device("meta"):
        gpt2 = ours(tiny_gpt2(), r=4, target_modules=["c_attn"])
    ids = token_ids(2, 7).to("meta")
    assert gpt2(ids).logits.shape[:2] == (2, 7)
