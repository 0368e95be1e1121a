"""Shared-input reuse (docs/DESIGN.md §2.7): sibling layers reading one input compute u = x A^T once, save it once,
and their backward does one grad_u @ A. Checked by counting the A-side GEMMs of a training step, and against PEFT
0.21.2's VeRA (outputs and lambda gradients) in eager mode, with dropout, checkpointing, compile and mixed batches."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vera_ext import ops, shared_input
from vera_ext.layer import VeraLinear
from vera_models import ours, peft_model, randomize_lambdas, tiny_llama, token_ids, twins

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ASideGemms(TorchDispatchMode):
    """Counts u = x A^T (vera_project) and grad_u @ A (its backward) by the projection's storage."""

    def __init__(self, vera_A: torch.Tensor):
        super().__init__()
        self.ptr = vera_A.untyped_storage().data_ptr()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.vera_ext.vera_project.default:
            self.forward += 1
        elif func is torch.ops.aten.mm.default and args[1].untyped_storage().data_ptr() == self.ptr:
            self.backward += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_merged_weight(monkeypatch):
    # the W + dW path sends no gradient through A at all; count the path that does
    monkeypatch.setattr(ops, "merged_weight_mode", lambda *a, **k: "none")
    yield


def count_a_side(model, share: bool, monkeypatch):
    if not share:
        monkeypatch.setattr(shared_input, "projected", lambda x, A, projection: ops.vera_project(x, A))
    counter = ASideGemms(model.vera_projection.vera_A)
    ids = token_ids()
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.forward, counter.backward


@pytest.mark.parametrize("share", [True, False])
def test_a_side_gemms_per_block_drop_from_four_to_two(share, monkeypatch):
    model = ours(tiny_llama(), r=8, target_modules=QKVO)  # GQA: k/v narrower than q, one in_features
    randomize_lambdas(model)
    blocks = model.config.num_hidden_layers
    with no_merged_weight(monkeypatch):
        fwd, bwd = count_a_side(model, share, monkeypatch)
    per_block = 2 if share else 4  # (q, k, v share one u; o reads the attention output)
    first_qkv = 1 if share else 3  # (the first block's input needs no gradient: no grad_u @ A there)
    assert (fwd, bwd) == (per_block * blocks, per_block * blocks - first_qkv)


@pytest.mark.parametrize("mode", ["kept", "backward", "both"])
def test_merged_weight_paths_take_no_grad_through_a(mode, monkeypatch):
    model = ours(tiny_llama(), r=8, target_modules=QKVO)
    monkeypatch.setattr(ops, "merged_weight_mode", lambda *a, **k: mode)
    fwd, bwd = count_a_side(model, True, monkeypatch)
    # (the first block's q, k, v: their x needs no gradient, so nothing goes through W + dW there; u's own
    # gradient is then not needed either)
    assert (fwd, bwd) == (2 * model.config.num_hidden_layers, 0)


@pytest.mark.parametrize("mode", ["kept", "backward", "both"])
def test_merged_weight_is_formed_once_per_step(mode, monkeypatch):
    """W + dW is formed once per layer and pass that runs through it: once a step when kept, twice for "both"."""
    model = ours(tiny_llama(), r=8, target_modules=QKVO)
    randomize_lambdas(model)
    monkeypatch.setattr(ops, "merged_weight_mode", lambda *a, **k: mode)
    ids = token_ids()
    with torch.profiler.profile(record_shapes=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, VeraLinear)}
    # (a layer whose x needs no gradient has no grad_x to form it for in the backward: the first q, k, v; "kept"
    # then forms it in the forward anyway, as the test forces the mode)
    first_qkv = {n for n in layers if ".layers.0." in n and "o_proj" not in n}
    shapes = [(m.out_features, 8, m.in_features) for m in layers.values()]
    backward = [(m.out_features, 8, m.in_features) for n, m in layers.items() if n not in first_qkv]
    want = sorted({"kept": shapes, "backward": backward, "both": shapes + backward}[mode])
    got = sorted(
        (e.input_shapes[0][0], e.input_shapes[0][1], e.input_shapes[1][1])
        for e in prof.events()
        if e.name == "aten::mm"
        and len(e.input_shapes) == 2
        and e.input_shapes[0][1:] == [8]
        and e.input_shapes[1][0] == 8
        and e.input_shapes[0][0] != ids.numel()
    )
    assert got == want


def _lambda_grads(model, strip=""):
    return {n.removeprefix(strip): p.grad for n, p in model.named_parameters() if "vera_lambda" in n}


def _step_against_peft(prepare=lambda m: m, run=None, dropout=0.0, merged=None, monkeypatch=None):
    """One training step of vera_ext and PEFT on twin tiny Llamas; asserts equal losses and lambda gradients."""
    if merged is not None:
        monkeypatch.setattr(ops, "merged_weight_mode", lambda *a, **k: merged)
    a, b = twins(tiny_llama)
    config = dict(r=8, target_modules=QKVO, init_weights=False, vera_dropout=dropout)
    torch.manual_seed(7)
    vm = prepare(ours(a, **config).train())
    torch.manual_seed(7)
    pm = prepare(peft_model(b, **config).train())
    ids = token_ids()
    losses = []
    for model in (vm, pm):
        torch.manual_seed(11)  # (the same dropout masks: both drop x once per layer, in the same order)
        out = (run or (lambda m: m(input_ids=ids, labels=ids)))(model)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    g_vm, g_pm = _lambda_grads(vm), _lambda_grads(pm, "base_model.")
    assert g_vm.keys() == g_pm.keys() and len(g_vm) == 8 * 2
    for name in g_vm:
        torch.testing.assert_close(g_vm[name], g_pm[name], atol=1e-6, rtol=1e-4, msg=name)
    return vm


@pytest.mark.parametrize("merged", ["none", "forward", "backward", "both", "kept"])
def test_shared_step_equals_peft(merged, monkeypatch):
    _step_against_peft(merged=merged, monkeypatch=monkeypatch)


def test_dropout_layers_do_not_share_and_equal_peft(monkeypatch):
    shared = []  # the projections offered for sharing (None: a dropped x of the layer's own)
    real = shared_input.projected
    monkeypatch.setattr(shared_input, "projected", lambda x, A, p: shared.append(p) or real(x, A, p))
    _step_against_peft(dropout=0.2)
    assert shared and all(p is None for p in shared)  # every layer drops its own copy of x


@pytest.mark.parametrize("merged", ["none", "forward", "backward", "both", "kept"])
def test_gradient_checkpointing_shares_and_equals_peft(merged, monkeypatch):
    def prepare(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    _step_against_peft(prepare, merged=merged, monkeypatch=monkeypatch)


def test_compiled_step_equals_peft(monkeypatch):
    compiled = {}

    def prepare(model):
        if not compiled:  # vera_ext's model (built first) runs compiled, PEFT's eager
            compiled[id(model)] = torch.compile(model, backend="aot_eager", fullgraph=True)
        return model

    def run(model):
        ids = token_ids()
        return compiled.get(id(model), model)(input_ids=ids, labels=ids)

    with no_merged_weight(monkeypatch):
        _step_against_peft(prepare, run=run)
    torch._dynamo.reset()


def test_compiled_forward_computes_u_once_per_group():
    model = ours(tiny_llama(), r=8, target_modules=QKVO)
    seen = []

    def backend(gm, example_inputs):
        seen.append(sum(str(n.target) == "vera_ext.vera_project" for n in gm.graph.nodes))
        return gm

    ids = token_ids()
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    assert seen == [2 * model.config.num_hidden_layers]


class CheckpointedSiblings(torch.nn.Module):
    """q, k and v reading one input inside torch.utils.checkpoint: a model that checkpoints on its own."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))

    def block(self, x):
        return torch.tanh(self.q(x)) * self.k(x) + self.v(x)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_compiled_model_that_checkpoints_itself_runs_unshared_and_equals_eager():
    """Dynamo refuses side effects inside a checkpointed region, and only a transformers model says whether it
    checkpoints: a compiled VeraModel of any other model opens no sharing scope, so it compiles (each layer with its
    own u) and equals eager, which shares."""
    torch.manual_seed(0)
    model = ours(CheckpointedSiblings(), r=8, target_modules=["q", "k", "v"], init_weights=False)
    randomize_lambdas(model)
    x = torch.randn(24, 32, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    got.square().sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_mixed_batch_shares_and_equals_per_adapter_runs(monkeypatch):
    model = ours(tiny_llama(), r=8, target_modules=QKVO, init_weights=False)
    from vera_ext.config import VeraConfig

    model.add_adapter("other", VeraConfig(r=8, target_modules=QKVO, init_weights=False))
    randomize_lambdas(model)
    ids = token_ids(batch=2, seq=12)  # (24 rows: above the one-pass forward's limit)
    names = ["default", "other"]
    counter = ASideGemms(model.vera_projection.vera_A)
    with counter:
        mixed = model(input_ids=ids, adapter_names=names).logits
        mixed.float().pow(2).sum().backward()
    assert counter.forward == 2 * model.config.num_hidden_layers
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(names):
        model.set_adapter(name)
        single = model(input_ids=ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=1e-5)
        single.float().pow(2).sum().backward()
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_u_is_not_carried_over_to_the_next_step():
    """An input held across steps (a fixed batch) gets a fresh u after each backward, and a new one after an in-place
    change; the gradients equal those of a fresh tensor every time."""
    layer_q = VeraLinear(torch.nn.Linear(40, 40), r=4, init_weights=False)
    layer_k = VeraLinear(torch.nn.Linear(40, 6), r=4, projection=layer_q.vera_projection, init_weights=False)
    x = torch.randn(30, 40, requires_grad=True)
    counter = ASideGemms(layer_q.vera_projection.vera_A)
    for step in range(3):
        if step == 2:
            with torch.no_grad():
                x.mul_(2)  # a new version
        fresh = x.detach().clone().requires_grad_()
        for inp in (x, fresh):
            with counter:
                (layer_q(inp).sum() + layer_k(inp).pow(2).sum()).backward()
        torch.testing.assert_close(x.grad, fresh.grad)
        x.grad = None
    assert counter.forward == 6  # one u per input and step: shared by q and k, never reused from a step before
    assert len(shared_input._EAGER[x]) == 1  # and what the earlier steps left is gone
