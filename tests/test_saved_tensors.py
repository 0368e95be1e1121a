"""Backward under activation checkpointing and saved-tensor hooks: every autograd op of vera_ext/ops.py (and
VeraLinear, and a tiny Llama) reads ``ctx.saved_tensors`` once per backward, so non-reentrant checkpointing (which
refuses a second unpack with CheckpointError), reentrant checkpointing, a hook pair that refuses a second unpack and
``save_on_cpu`` all give the plain run's gradients bit for bit.

Shapes sit on both sides of the path thresholds (docs/DESIGN.md §2.5, CPU): decode N <= 4, the per-row path with an
adapter_idx, the folded path otherwise (N below and above r), merged forward N·r > I·(r+1) and merged backward
N·r·(I+O) > I·O·(r+1)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import vera_ext
from vera_ext import ops
from vera_ext.layer import VeraLinear

from vera_models import ScaledLinear, tiny_llama

DTYPES = [torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------------ modes


class _Packed:
    __slots__ = ("tensor", "unpacked")

    def __init__(self, tensor):
        self.tensor, self.unpacked = tensor, False


def _pack(t):
    return _Packed(t)


def _unpack_once(p):
    if p.unpacked:
        raise RuntimeError("saved tensor unpacked twice in one backward")
    p.unpacked = True
    return p.tensor


def _call(mode, fn, args):
    """fn(*args) as ``mode`` runs it; backward must happen inside the same context for the hook modes."""
    if mode == "checkpoint":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "reentrant":
        return checkpoint(fn, *args, use_reentrant=True)
    return fn(*args)


def _context(mode):
    if mode == "unpack_once":
        return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack_once)
    if mode == "save_on_cpu":
        return torch.autograd.graph.save_on_cpu()
    return contextlib.nullcontext()


MODES = ["checkpoint", "reentrant", "unpack_once", "save_on_cpu"]


def _run(mode, fn, args, leaves, grad_out):
    """Gradients (via .grad: reentrant checkpointing does not support autograd.grad) of ``leaves`` after
    backward of ``(fn(*args) * grad_out).sum()``."""
    for t in leaves:
        t.grad = None
    with _context(mode):
        y = _call(mode, fn, args)
        (y * grad_out).sum().backward()
    grads = [t.grad for t in leaves]
    assert all(g is not None for g in grads)
    return grads


def _assert_same_in_every_mode(fn, args, leaves, grad_out):
    """Every mode runs (a failure in one does not hide the others) and must match the plain run exactly."""
    reference = _run("plain", fn, args, leaves, grad_out)
    failures = []
    for mode in MODES:
        try:
            got = _run(mode, fn, args, leaves, grad_out)
        except Exception as err:  # (reported with the other modes below)
            failures.append(f"{mode}: {type(err).__name__}: {str(err)[:160]}")
            continue
        for i, (g, ref) in enumerate(zip(got, reference)):
            if g.dtype != ref.dtype or g.shape != ref.shape or not torch.equal(g, ref):
                failures.append(f"{mode}: gradient {i} differs from the plain run")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------ operands

# name: (leading dims of x, I, O, r, adapters K or None)
CASES = {
    "decode_n16": ((16,), 12, 10, 6, None),
    "rowwise_n17_lt_r": ((17,), 12, 10, 24, None),
    "dense": ((24,), 64, 64, 4, None),
    "merged": ((40,), 12, 10, 6, None),
    "dense_3d": ((3, 10), 16, 14, 4, None),
    "mixed_decode": ((6,), 12, 10, 6, 3),
    "mixed_rowwise": ((20,), 12, 10, 6, 3),
}


def _operands(shape, i, o, r, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # A, B as strided slices of a larger frozen projection, as the layers pass them
    A = torch.randn(r + 2, i + 3, generator=g, dtype=dtype)[:r, :i]
    B = torch.randn(o + 1, r + 2, generator=g, dtype=dtype)[:o, :r]
    x = torch.randn(*shape, i, generator=g, dtype=dtype).requires_grad_()
    base = torch.randn(*shape, o, generator=g, dtype=dtype).requires_grad_()
    ld = torch.randn(*((k,) if k else ()), r, generator=g, dtype=acc).requires_grad_()
    lb = torch.randn(*((k,) if k else ()), o, generator=g, dtype=acc).requires_grad_()
    idx = None
    if k:
        n = x.numel() // i
        idx = torch.arange(n, dtype=torch.int64) % (k + 1) - 1  # every adapter and some "-1" (base only) rows
    grad_out = torch.randn(*shape, o, generator=g, dtype=dtype)
    return x, base, A, B, ld, lb, idx, grad_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_vera_forward(case, dtype):
    x, base, A, B, ld, lb, idx, grad_out = _operands(*CASES[case], dtype)

    def fn(x, base, ld, lb):
        return ops.vera_forward(x, base, A, B, ld, lb, idx)

    _assert_same_in_every_mode(fn, (x, base, ld, lb), [x, base, ld, lb], grad_out)


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trained_base"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_vera_linear_forward(case, dtype, with_bias, train_base):
    shape, i, o, r, k = CASES[case]
    x, _, A, B, ld, lb, idx, grad_out = _operands(shape, i, o, r, k, dtype)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(o, i, generator=g, dtype=dtype).requires_grad_(train_base)
    bias = torch.randn(o, generator=g, dtype=dtype).requires_grad_(train_base) if with_bias else None

    def fn(x, ld, lb):
        return ops.vera_linear_forward(x, weight, bias, A, B, ld, lb, idx)

    # a trained base weight makes the op save x as well (the saved tuple's last entry)
    leaves = [x, ld, lb] + ([weight] + ([bias] if with_bias else []) if train_base else [])
    _assert_same_in_every_mode(fn, (x, ld, lb), leaves, grad_out)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vera_delta_weight(dtype, fan_in_fan_out):
    _, _, A, B, ld, lb, _, _ = _operands((2,), 12, 10, 6, None, dtype)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(*((12, 10) if fan_in_fan_out else (10, 12)), generator=g, dtype=dtype)

    def fn(ld, lb):
        return ops.vera_delta_weight(A, B, ld, lb, fan_in_fan_out, dtype)

    _assert_same_in_every_mode(fn, (ld, lb), [ld, lb], grad_out)


# ------------------------------------------------------------------------------------------------ VeraLinear


def _layer(base_kind, dtype, mixed):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(dtype) if base_kind == "linear" else ScaledLinear(12, 10).to(dtype)
    layer = VeraLinear(base, r=8, init_weights=False)  # lambda_b = 1, lambda_d ~ randn: no zero gradients
    if mixed:
        layer.update_layer("other", 4, init_weights=False)
    return layer


@pytest.mark.parametrize("mixed", [False, True], ids=["single", "mixed_batch"])
@pytest.mark.parametrize("rows", [(2, 4), (4, 8)], ids=["decode_n8", "n32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base_kind", ["linear", "custom"])
def test_vera_linear_layer(base_kind, dtype, rows, mixed):
    layer = _layer(base_kind, dtype, mixed)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*rows, 12, generator=g, dtype=dtype).requires_grad_()
    grad_out = torch.randn(*rows, 10, generator=g, dtype=dtype)
    names = None
    if mixed:
        names = (["default", "other", vera_ext.layer.BASE_ADAPTER] * rows[0])[: rows[0]]

    def fn(x):
        return layer(x, adapter_names=names) if names else layer(x)

    used = ["default", "other"] if mixed else ["default"]
    leaves = [x] + [store[n] for n in used for store in (layer.vera_lambda_d, layer.vera_lambda_b)]
    _assert_same_in_every_mode(fn, (x,), leaves, grad_out)


# ------------------------------------------------------------------------------------------------ tiny Llama


def _llama_lambda_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_llama_gradient_checkpointing(use_reentrant):
    pytest.importorskip("transformers")
    base = tiny_llama(seed=0)  # attention dropout 0: the runs with and without checkpointing must match
    model = vera_ext.get_vera_model(
        base, vera_ext.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], init_weights=False, vera_dropout=0.0)
    )
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))

    reference = _llama_lambda_grads(model, ids)
    assert reference and all(n.split(".")[-2].startswith("vera_lambda_") for n in reference)

    # on the wrapped transformers model (what Trainer's gradient_checkpointing=True calls)
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = _llama_lambda_grads(model, ids)
    assert got.keys() == reference.keys()
    # (checkpointing makes the embeddings' output need a gradient, which may switch a layer between W + dW and the
    # unmerged form: docs/DESIGN.md §2.7; the two differ by fp32 rounding)
    for name, ref in reference.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-7, msg=name)
