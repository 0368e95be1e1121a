"""Functional VeRA operators: ``torch.ops.vera_ext.*`` with fake (meta) kernels and autograd.

Notation (docs/DESIGN.md §2): ``x`` is ``(N, I)``, base output ``(N, O)``; ``A`` ``(r, I)`` and ``B`` ``(O, r)`` are
slices of the shared frozen projection, taken as views (``vera_A[:r, :I]``, ``vera_B[:O, :r]``), never copied.
``lambda_d`` ``(r,)`` and ``lambda_b`` ``(O,)`` are float32 (float64 for float64 data). For a mixed batch,
``adapter_idx`` ``(N,)`` int64 names the adapter of each row (``-1``: none) and the lambdas are stacked: ``(K, r)``
and ``(K, O)``.

    u = x @ A.T                                   (N, r), the only activation kept for backward
    y = base + lambda_b * ((u * lambda_d) @ B.T)

The projection slices must already have x's dtype (cast once and reuse; ``VeraLinear`` caches this).
Gradients flow to ``x``, ``base_out`` (and ``weight``/``bias`` for the fused op) and both lambdas; the
projection is frozen and must not require grad.

Under ``torch.autocast`` the two forward ops compute in the autocast dtype like ``F.linear``, lambdas kept fp32
(see :mod:`vera_ext.autocast`). All ops trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library: registers torch.ops.vera_ext.*)

_ops = torch.ops.vera_ext

__all__ = [
    "vera_forward",
    "vera_linear_forward",
    "vera_project",
    "vera_apply",
    "vera_linear_apply",
    "merged_weight_mode",
    "backward_count",
    "vera_delta_weight",
    "vera_merge_",
]


def _flatten(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a no-op reshape still costs ~1 us per call)


def _unflatten(y: Tensor, like: Tensor) -> Tensor:
    """The op's (N, O) output with ``like``'s leading dims. Not a view (aten's own matmul reshapes the same way): FSDP2
    warns on modules that return views, since an in-place op on one would skip its pre-backward hook."""
    if like.dim() == 2:
        return y
    return torch.ops.aten._unsafe_view(y, (*like.shape[:-1], y.shape[-1]))


def vera_forward(
    x: Tensor,
    base_out: Tensor,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_idx: Optional[Tensor] = None,
) -> Tensor:
    """``base_out + lambda_b * ((x @ A.T) * lambda_d) @ B.T`` for any base module's output.

    x: ``(..., I)``; base_out: ``(..., O)`` with the same leading dims and dtype; returns ``(..., O)``.
    adapter_idx: ``(N,)`` over the flattened leading dims, or None.
    """
    x2, b2 = _flatten(x), _flatten(base_out)
    y, _ = _ops.vera_forward(x2, b2, A, B, lambda_d, lambda_b, adapter_idx)
    return _unflatten(y, base_out)


def vera_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_idx: Optional[Tensor] = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the VeRA term, in one op. x: ``(..., I)``; weight ``(O, I)``;
    returns ``(..., O)``."""
    x2 = _flatten(x)
    y, _ = _ops.vera_linear_forward(x2, weight, bias, A, B, lambda_d, lambda_b, adapter_idx)
    return _unflatten(y, x)


# ----------------------------------------------------------------------------------------- the training form
# docs/DESIGN.md §2.7: u = x @ A.T is computed by vera_project, once for every layer that reads the same x with the
# same A (vera_ext.shared_input), and handed to the apply ops. Their gradient w.r.t. u is summed by autograd over
# those layers before vera_project's backward does the one grad_u @ A.


def vera_project(x: Tensor, A: Tensor) -> Tensor:
    """``u = x @ A.T``: x ``(..., I)``, A ``(r, I)`` (frozen, x's dtype); returns ``(N, r)`` over the flattened
    leading dims. Its backward keeps A by reference rather than as a saved tensor, so a ``u`` reused by a later
    forward (the same x) can be differentiated again."""
    return _ops.vera_project(_flatten(x), A)


def vera_apply(
    u: Tensor,
    base_out: Tensor,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_idx: Optional[Tensor] = None,
) -> Tensor:
    """``base_out + lambda_b * ((u * lambda_d) @ B.T)`` for ``u = vera_project(x, A)``: base_out ``(..., O)``, u
    ``(N, r)`` over its flattened leading dims; returns ``(..., O)``. (A is passed for the checks only.)"""
    y = _ops.vera_apply(u, _flatten(base_out), A, B, lambda_d, lambda_b, adapter_idx)
    return _unflatten(y, base_out)


def vera_linear_apply(
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_idx: Optional[Tensor] = None,
    merged: str = "none",
) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the VeRA term from ``u = vera_project(x, A)``: x ``(..., I)``, u ``(N, r)``;
    returns ``(..., O)``. ``merged`` (see :func:`merged_weight_mode`) says which passes run through ``W + dW``:
    ``"none"``, ``"forward"``, ``"backward"``, ``"both"`` (formed in each) or ``"kept"`` (formed in the forward and
    kept for the backward). A backward through ``W + dW`` takes the whole input gradient there and sends none to u,
    so u must be this x's projection, as vera_project gives it."""
    y, _ = _ops.vera_linear_apply(_flatten(x), u, weight, bias, A, B, lambda_d, lambda_b, adapter_idx, merged)
    return _unflatten(y, x)


def merged_weight_mode(
    rows: int, in_features: int, out_features: int, r: int, need_input_grad: bool, keep: bool = False
) -> str:
    """Where a training step of vera_linear_apply forms ``W + dW`` (fp32/fp64 data and one adapter: the caller
    checks those). Counted in multiply-adds per step, forming it costs ``O*r*I`` (plus the ``O*I`` add); the
    unmerged layer pays ``z = h @ B.T`` in the forward (``N*r*O``) and, when x needs a gradient, ``g @ B_hat``
    (``N*O*r``) and ``gh @ A`` (``N*r*I``) in the backward. Each pass forms it where that is cheaper (with O = I: the
    forward from N = I, the backward from N = I/2): ``"none"``, ``"forward"``, ``"backward"`` or ``"both"``.

    With ``keep`` (and x needing a gradient), ``"kept"`` where forming it once for both passes beats the unmerged
    step (from N = I/3): the forward keeps ``W + dW`` for the backward, an (O, I) tensor saved for the backward
    that the other modes do not save.
    """
    formed = out_features * in_features * (r + 1)
    forward = rows * r * out_features
    backward = rows * r * (out_features + in_features) if need_input_grad else 0
    if keep and need_input_grad and formed < forward + backward:
        return "kept"
    in_forward, in_backward = formed < forward, formed < backward
    if in_forward and in_backward:
        return "both"
    return "forward" if in_forward else "backward" if in_backward else "none"


def vera_delta_weight(
    A: Tensor, B: Tensor, lambda_d: Tensor, lambda_b: Tensor, fan_in_fan_out: bool = False, dtype=None
) -> Tensor:
    """``diag(lambda_b) B diag(lambda_d) A``: ``(O, I)``, or ``(I, O)`` with fan_in_fan_out. Computed in fp32
    and cast once to ``dtype`` (default: B's dtype)."""
    return _ops.vera_delta_weight(A, B, lambda_d, lambda_b, fan_in_fan_out, dtype or B.dtype)


def vera_merge_(
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    alpha: float = 1.0,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> None:
    """``weight += alpha * delta_weight`` in place, accumulated in fp32 and rounded once (alpha=-1 unmerges).
    With ``safe``, raises ValueError and leaves ``weight`` untouched if any merged value would be non-finite."""
    _ops.vera_merge_(weight, A, B, lambda_d, lambda_b, float(alpha), fan_in_fan_out, safe)


# ----------------------------------------------------------------------------------------------- fake kernels


def _check_devices(ref_name: str, ref: Tensor, **operands) -> None:
    """The device check of the real kernels (csrc/common/checks.cpp). The fake kernels need it too: one operand on
    the meta device next to real ones dispatches here, and would otherwise return uninitialized real tensors."""
    for name, t in operands.items():
        if isinstance(t, Tensor) and t.device != ref.device:
            raise RuntimeError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _check_backward_devices(grad_out, u, A, B, lambda_d, lambda_b, adapter_idx, weight) -> None:
    _check_devices(
        "grad_out",
        grad_out,
        u=u,
        A=A,
        B=B,
        lambda_d=lambda_d,
        lambda_b=lambda_b,
        adapter_idx=adapter_idx,
        weight=weight,
    )


@torch.library.register_fake("vera_ext::vera_forward")
def _(x, base_out, A, B, lambda_d, lambda_b, adapter_idx=None):
    _check_devices("x", x, base_out=base_out, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b, adapter_idx=adapter_idx)
    return torch.empty_like(base_out, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("vera_ext::vera_linear_forward")
def _(x, weight, bias, A, B, lambda_d, lambda_b, adapter_idx=None):
    _check_devices(
        "x", x, weight=weight, bias=bias, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b, adapter_idx=adapter_idx
    )
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("vera_ext::vera_backward")
def _(grad_out, u, A, B, lambda_d, lambda_b, adapter_idx, weight, output_mask):
    _check_backward_devices(grad_out, u, A, B, lambda_d, lambda_b, adapter_idx, weight)
    grad_x = grad_out.new_empty(grad_out.shape[0], A.shape[1]) if output_mask[0] else grad_out.new_empty(0)
    grad_ld = lambda_d.new_empty(lambda_d.shape) if output_mask[1] else grad_out.new_empty(0)
    grad_lb = lambda_b.new_empty(lambda_b.shape) if output_mask[2] else grad_out.new_empty(0)
    return grad_x, grad_ld, grad_lb


@torch.library.register_fake("vera_ext::vera_project")
def _(x, A):
    _check_devices("x", x, A=A)
    return x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("vera_ext::vera_apply")
def _(u, base_out, A, B, lambda_d, lambda_b, adapter_idx=None):
    _check_devices("base_out", base_out, u=u, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b, adapter_idx=adapter_idx)
    return torch.empty_like(base_out, memory_format=torch.contiguous_format)


@torch.library.register_fake("vera_ext::vera_linear_apply")
def _(x, u, weight, bias, A, B, lambda_d, lambda_b, adapter_idx=None, merged="none"):
    _check_devices(
        "x", x, u=u, weight=weight, bias=bias, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b, adapter_idx=adapter_idx
    )
    kept = weight.new_empty(weight.shape) if merged == "kept" else x.new_empty(0)
    return x.new_empty(x.shape[0], weight.shape[0]), kept


@torch.library.register_fake("vera_ext::vera_apply_backward")
def _(grad_out, u, A, B, lambda_d, lambda_b, adapter_idx, weight, add_delta, output_mask):
    _check_backward_devices(grad_out, u, A, B, lambda_d, lambda_b, adapter_idx, weight)

    def empty():  # (a fresh one per output: outputs must not alias, as the real op's do not)
        return grad_out.new_empty(0)

    grad_x = grad_out.new_empty(grad_out.shape[0], A.shape[1]) if output_mask[0] else empty()
    grad_u = u.new_empty(u.shape) if output_mask[1] else empty()
    grad_ld = lambda_d.new_empty(lambda_d.shape) if output_mask[2] else empty()
    grad_lb = lambda_b.new_empty(lambda_b.shape) if output_mask[3] else empty()
    return grad_x, grad_u, grad_ld, grad_lb


@torch.library.register_fake("vera_ext::vera_delta_weight")
def _(A, B, lambda_d, lambda_b, fan_in_fan_out, dtype):
    _check_devices("A", A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    shape = (A.shape[1], B.shape[0]) if fan_in_fan_out else (B.shape[0], A.shape[1])
    return A.new_empty(shape, dtype=dtype)


@torch.library.register_fake("vera_ext::vera_merge_")
def _(weight, A, B, lambda_d, lambda_b, alpha, fan_in_fan_out, safe):
    _check_devices("A", A, weight=weight, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    return None


# -------------------------------------------------------------------------------------------------- autograd


def _refuse_projection_grad(A: Tensor, B: Tensor) -> None:
    if A.requires_grad or B.requires_grad:
        raise RuntimeError(
            "vera_ext: the VeRA projections A and B are frozen; pass them without requires_grad "
            f"(A.requires_grad={A.requires_grad}, B.requires_grad={B.requires_grad})"
        )


def _save_adapter(ctx, A, B, lambda_d, lambda_b, adapter_idx, u, weight=None, x=None):
    _refuse_projection_grad(A, B)
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)  # no (N, r) zeros for u's gradient; grad_y may then be None too
    ctx.save_for_backward(u, A, B, lambda_d, lambda_b, adapter_idx, weight, x)


def _adapter_grads(saved, grad_y, need_x, need_ld, need_lb):
    """(grad_x, grad_lambda_d, grad_lambda_b), each None when not needed; grad_x includes grad_y @ weight when a
    fused base weight was saved. ``saved`` is ``ctx.saved_tensors``, unpacked once by the caller: each read of
    ``ctx.saved_tensors`` unpacks again, which non-reentrant checkpointing refuses (CheckpointError) and which
    repeats the unpack hook of ``saved_tensors_hooks`` (e.g. a device copy for ``save_on_cpu``)."""
    u, A, B, lambda_d, lambda_b, adapter_idx, weight, _ = saved
    if not (need_x or need_ld or need_lb):
        return None, None, None
    gx, gld, glb = _ops.vera_backward(
        grad_y, u, A, B, lambda_d, lambda_b, adapter_idx, weight, [need_x, need_ld, need_lb]
    )
    return gx if need_x else None, gld if need_ld else None, glb if need_lb else None


def _setup_forward(ctx, inputs, output):
    x, base_out, A, B, lambda_d, lambda_b, adapter_idx = inputs
    _save_adapter(ctx, A, B, lambda_d, lambda_b, adapter_idx, output[1])


def _backward_forward(ctx, grad_y, _grad_u):
    if grad_y is None:
        return (None,) * 7
    # (adapter_idx may be left out of needs_input_grad when it takes its default)
    need_x, need_base, _, _, need_ld, need_lb = ctx.needs_input_grad[:6]
    grad_x, grad_ld, grad_lb = _adapter_grads(ctx.saved_tensors, grad_y, need_x, need_ld, need_lb)
    return grad_x, grad_y if need_base else None, None, None, grad_ld, grad_lb, None


torch.library.register_autograd("vera_ext::vera_forward", _backward_forward, setup_context=_setup_forward)


def _setup_linear(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, adapter_idx = inputs
    # x is kept only when the base weight itself is trained; VeRA alone needs just u.
    _save_adapter(ctx, A, B, lambda_d, lambda_b, adapter_idx, output[1], weight, x if weight.requires_grad else None)
    ctx.has_bias = bias is not None


def _backward_linear(ctx, grad_y, _grad_u):
    if grad_y is None:
        return (None,) * 8
    need_x, need_w, need_bias, _, _, need_ld, need_lb = ctx.needs_input_grad[:7]
    saved = ctx.saved_tensors  # read once (see _adapter_grads)
    grad_x, grad_ld, grad_lb = _adapter_grads(saved, grad_y, need_x, need_ld, need_lb)
    x = saved[-1]
    grad_w = grad_y.t().mm(x) if need_w else None
    grad_bias = grad_y.sum(0) if need_bias and ctx.has_bias else None
    return grad_x, grad_w, grad_bias, None, None, grad_ld, grad_lb, None


torch.library.register_autograd("vera_ext::vera_linear_forward", _backward_linear, setup_context=_setup_linear)


def _setup_project(ctx, inputs, output):
    x, A = inputs
    _refuse_projection_grad(A, A)
    ctx.set_materialize_grads(False)  # (a merged consumer sends no gradient to u: no zeros, no GEMM)
    # A is kept by reference, not saved: a saved tensor is freed by the backward, and a u shared with a later forward
    # of the same x (vera_ext.shared_input) must stay differentiable. A is a frozen buffer that outlives the graph.
    ctx.A = A


def _backward_project(ctx, grad_u):
    if grad_u is None or not ctx.needs_input_grad[0]:
        return None, None
    return grad_u.mm(ctx.A), None


torch.library.register_autograd("vera_ext::vera_project", _backward_project, setup_context=_setup_project)


_BACKWARDS = [0]  # backward calls of the apply ops so far (shared_input: a u from before the last one is stale)


def backward_count() -> int:
    """How many times an apply op's backward has run in this process: vera_ext.shared_input reuses a u only within
    one forward-backward, so that a step that feeds the same input tensor again computes its own u."""
    return _BACKWARDS[0]


def _apply_grads(adapter, grad_y, weight, add_delta, need_x, need_u, need_ld, need_lb):
    """(grad_x, grad_u, grad_lambda_d, grad_lambda_b) of the apply ops, each None when not needed. ``adapter``: the
    saved (u, A, B, lambda_d, lambda_b, adapter_idx)."""
    _BACKWARDS[0] += 1
    u, A, B, lambda_d, lambda_b, adapter_idx = adapter
    mask = [need_x, need_u, need_ld, need_lb]
    if not any(mask):
        return None, None, None, None
    grads = _ops.vera_apply_backward(grad_y, u, A, B, lambda_d, lambda_b, adapter_idx, weight, add_delta, mask)
    return tuple(g if need else None for g, need in zip(grads, mask))


def _setup_apply(ctx, inputs, output):
    u, base_out, A, B, lambda_d, lambda_b, adapter_idx = inputs
    _refuse_projection_grad(A, B)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, A, B, lambda_d, lambda_b, adapter_idx)


def _backward_apply(ctx, grad_y):
    if grad_y is None:
        return (None,) * 7
    need_u, need_base, _, _, need_ld, need_lb = ctx.needs_input_grad[:6]
    saved = ctx.saved_tensors  # (read once: see _adapter_grads)
    _, grad_u, grad_ld, grad_lb = _apply_grads(saved, grad_y, None, False, False, need_u, need_ld, need_lb)
    return grad_u, grad_y if need_base else None, None, None, grad_ld, grad_lb, None


torch.library.register_autograd("vera_ext::vera_apply", _backward_apply, setup_context=_setup_apply)


def _setup_linear_apply(ctx, inputs, output):
    x, u, weight, bias, A, B, lambda_d, lambda_b, adapter_idx, merged = inputs
    _refuse_projection_grad(A, B)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.merged, ctx.has_bias = merged, bias is not None
    # grad_x goes through W + dW kept by the forward ("kept"), or through W; x only when W is trained.
    grad_weight = output[1] if merged == "kept" else weight
    x_kept = x if weight.requires_grad else None
    ctx.save_for_backward(u, A, B, lambda_d, lambda_b, adapter_idx, grad_weight, x_kept)


def _backward_linear_apply(ctx, grad_y, _grad_kept):
    if grad_y is None:
        return (None,) * 10
    need_x, need_u, need_w, need_bias, _, _, need_ld, need_lb = ctx.needs_input_grad[:8]
    saved = ctx.saved_tensors  # (read once: see _adapter_grads)
    adapter, grad_weight, x = saved[:6], saved[6], saved[7]
    # Through W + dW, grad_out @ (W + dW) is the whole input gradient, the part through u included (u = x @ A.T),
    # so u gets none; a u whose x needs no gradient still gets its own.
    merged = ctx.merged in ("kept", "backward", "both") and need_x
    add_delta = merged and ctx.merged != "kept"
    grads = _apply_grads(adapter, grad_y, grad_weight, add_delta, need_x, need_u and not merged, need_ld, need_lb)
    grad_x, grad_u, grad_ld, grad_lb = grads
    grad_w = grad_y.t().mm(x) if need_w else None
    grad_bias = grad_y.sum(0) if need_bias and ctx.has_bias else None
    return grad_x, grad_u, grad_w, grad_bias, None, None, grad_ld, grad_lb, None, None


torch.library.register_autograd(
    "vera_ext::vera_linear_apply", _backward_linear_apply, setup_context=_setup_linear_apply
)


def _setup_delta(ctx, inputs, output):
    A, B, lambda_d, lambda_b, fan_in_fan_out, _dtype = inputs
    _refuse_projection_grad(A, B)
    ctx.fan_in_fan_out = fan_in_fan_out
    ctx.save_for_backward(A, B, lambda_d, lambda_b)


def _backward_delta(ctx, grad):
    # delta = diag(lambda_b) B diag(lambda_d) A, so with G = dL/d(delta) as (O, I):
    #   dlambda_d[k] = sum_i (B_hat^T G)[k, i] A[k, i]      dlambda_b[o] = sum_k (G A_hat^T)[o, k] B[o, k]
    A, B, lambda_d, lambda_b = ctx.saved_tensors  # (read once: see _adapter_grads)
    acc = lambda_d.dtype
    G = (grad.t() if ctx.fan_in_fan_out else grad).to(acc)
    A, B = A.to(acc), B.to(acc)
    need_ld, need_lb = ctx.needs_input_grad[2:4]
    grad_ld = ((lambda_b[:, None] * B).t() @ G * A).sum(1) if need_ld else None
    grad_lb = ((G @ (lambda_d[:, None] * A).t()) * B).sum(1) if need_lb else None
    return None, None, grad_ld, grad_lb, None, None


torch.library.register_autograd("vera_ext::vera_delta_weight", _backward_delta, setup_context=_setup_delta)


# -------------------------------------------------------------------------------------------------- autocast

from . import autocast as _autocast  # noqa: E402,F401  (registers the Autocast kernels of the forward ops)
