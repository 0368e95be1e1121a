"""torch.compile(fullgraph=True) of models with VeRA layers: no graph breaks, eager results, no recompiles.

Most tests use backend="aot_eager": it runs AOTAutograd, so it exercises the ops' register_fake and
register_autograd, without inductor's code generation time. One test uses the default (inductor) backend.
"""

import pytest
import torch

import vera_ext
from vera_models import custom_mlp, mlp, ours, randomize_lambdas

TARGETS = ["lin0", "lin1", "lin2"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def vera_mlp(**config):
    model = ours(mlp(), **{"r": 8, "target_modules": TARGETS, **config})
    randomize_lambdas(model)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def forward_and_grads(fn, model, x):
    x = x if x.requires_grad else x.detach().requires_grad_()  # (a new tensor would lose mark_dynamic)
    y = fn(x)
    grads = torch.autograd.grad(y.square().sum(), [x] + trainable(model))
    return y.detach(), grads


def assert_matches_eager(model, compiled, x):
    y_ref, g_ref = forward_and_grads(model, model, x)
    y, g = forward_and_grads(compiled, model, x)
    torch.testing.assert_close(y, y_ref)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("train", [True, False])
def test_no_graph_breaks(train):
    model = vera_mlp(vera_dropout=0.1).train(train)
    model.add_adapter("other", vera_ext.VeraConfig(r=4, target_modules=["lin1"]))
    model.set_adapter(["default", "other"])  # two active adapters: the fused op plus one vera_forward
    explanation = torch._dynamo.explain(model)(torch.randn(4, 10))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("train", [True, False])
def test_fullgraph_forward_and_grads_equal_eager(train):
    model = vera_mlp().train(train)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_matches_eager(model, compiled, torch.randn(5, 10))
    assert_matches_eager(model, compiled, torch.randn(2, 3, 10))  # leading dims flattened inside


def test_non_linear_base_and_several_adapters_compile():
    model = ours(custom_mlp(), r=4, target_modules=["inp", "out"])  # inp is not nn.Linear: unfused path
    model.add_adapter("b", vera_ext.VeraConfig(r=4, target_modules=["inp", "out"]))
    randomize_lambdas(model)
    model.set_adapter(["default", "b"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_matches_eager(model, compiled, torch.randn(3, 6))


def test_no_recompiles_across_training_steps():
    model = vera_mlp().train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def step():
        optimizer.zero_grad()
        compiled(torch.randn(4, 10)).square().mean().backward()
        optimizer.step()

    step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_dynamic_batch_compiles_once():
    model = vera_mlp().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(torch.randn(2, 10))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (3, 7, 16, 5):
            x = torch.randn(batch, 10)
            torch.testing.assert_close(compiled(x), model(x))


def test_mark_dynamic_batch_and_sequence():
    model = vera_mlp().train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    first = torch.randn(2, 3, 10, requires_grad=True)
    torch._dynamo.mark_dynamic(first, 0)
    torch._dynamo.mark_dynamic(first, 1)
    assert_matches_eager(model, compiled, first)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in ((4, 5, 10), (3, 9, 10)):
            assert_matches_eager(model, compiled, torch.randn(shape))


@pytest.mark.parametrize("modules_to_save", [None, ["head"]])
def test_mixed_adapter_batch_compiles_and_equals_eager(modules_to_save):
    model = vera_mlp(modules_to_save=modules_to_save)
    model.add_adapter(
        "b",
        vera_ext.VeraConfig(r=6, target_modules=["lin1", "lin2"], init_weights=False, modules_to_save=modules_to_save),
    )
    if modules_to_save:
        with torch.no_grad():  # the samples of each adapter must run through that adapter's own head copy
            model.model.head.modules_to_save["b"].bias.add_(3.0)
    names = ["default", "__base__", "b", "b", "default"]
    compiled = torch.compile(lambda x: model(x, adapter_names=names), backend="aot_eager", fullgraph=True)
    if not modules_to_save:  # (modules_to_save allow one active adapter)
        model.set_adapter(["default", "b"])  # gradients for both adapters' lambdas
    x = torch.randn(5, 10, requires_grad=True)
    y_ref = model(x, adapter_names=names)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x] + trainable(model))
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x] + trainable(model))
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    receivers = [*model.vera_layers().values(), *model.modules_to_save_wrappers().values()]
    assert all(module._batch_adapter_names is None for module in receivers)
    with pytest.raises(Exception, match="non-existing adapter"):
        torch.compile(lambda x: model(x, adapter_names=["nope"] * 5), backend="aot_eager", fullgraph=True)(x)


def test_dropout_in_train_mode_compiles():
    model = vera_mlp(vera_dropout=0.5).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(64, 10)
    y, grads = forward_and_grads(compiled, model, x)
    y_no_dropout = model.eval()(x)
    # dropout draws differ from eager's, so only its effect is checked: some rows differ from the p=0 output
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert not torch.allclose(y, y_no_dropout)
    assert_matches_eager(model, torch.compile(model, backend="aot_eager", fullgraph=True), x)  # eval: equal


def test_inductor_forward_and_grads_equal_eager():
    model = vera_mlp().train()
    compiled = torch.compile(model, fullgraph=True)
    assert_matches_eager(model, compiled, torch.randn(5, 10))


def test_one_graph_serves_every_mix_of_adapter_indices():
    """The index tensor is a graph input: any mix of adapters (all base, all one adapter, all distinct, ...) runs
    through the one graph compiled for the shape, equal to eager."""
    model = vera_mlp()
    model.add_adapter("b", vera_ext.VeraConfig(r=6, target_modules=["lin1", "lin2"], init_weights=False))
    model.add_adapter("c", vera_ext.VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    randomize_lambdas(model)
    model.eval()
    compiled = torch.compile(lambda x, idx: model(x, adapter_indices=idx), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 10)
    mixes = [
        ["default", "b", "c", "__base__"],
        ["__base__"] * 4,
        ["b"] * 4,
        ["c", "c", "default", "default"],
        ["b", "__base__", "b", "c"],
        ["default"] * 4,
    ]
    with torch.no_grad():
        compiled(x, model.adapter_indices(mixes[0]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in mixes:
                want = model(x, adapter_names=names)
                torch.testing.assert_close(compiled(x, model.adapter_indices(names)), want, msg=str(names))
