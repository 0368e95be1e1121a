"""One ``u = x @ A.T`` for every VeRA layer that reads the same input with the same projection slice.

VeRA shares A between layers, so sibling projections that read one input (q, k and v; gate and up) would each
compute the same ``u``. :func:`projected` computes it once per (x, A) and hands the same tensor to every such layer:
the forward saves it once, and autograd sums the layers' gradients w.r.t. ``u`` before the one ``grad_u @ A`` of
``vera_project``'s backward (docs/DESIGN.md §2.7).

Where the memo lives:

* eager: a table keyed weakly by the input tensor itself, so an entry lives exactly as long as that input. Nothing
  has to open or close it, which is what gradient checkpointing needs: its recomputation runs outside the model's
  forward, on a fresh input, and must make the same sharing decisions the first forward made (it then does, since
  the recomputed siblings again read one new tensor). An entry is reused only while the input's and A's version
  counters and the grad mode are unchanged, and until a backward of the apply ops runs
  (:func:`~vera_ext.ops.backward_count`): an input tensor fed again in the next step (a benchmark, a fixed batch)
  gets its u computed again, as every other implementation computes it, rather than carried over between steps.
* ``torch.compile``: the weak table cannot be traced, so sharing needs a scope that :class:`~vera_ext.model.VeraModel`
  opens around its forward (:func:`open_scope` / :func:`close_scope`, a dict that lives for one call). Dynamo
  refuses side effects inside a checkpointed region, so the scope is opened only around a transformers model
  without activation checkpointing (the only kind that says whether it checkpoints); without a scope each layer
  computes its own ``u`` (AOTAutograd's CSE still merges the forward copies, not the backward GEMMs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops

__all__ = ["projected", "open_scope", "close_scope"]

# eager: input tensor -> [(projection, A's shape and dtype, A version, x version, grad mode, backwards, u)]
_EAGER: WeakIdKeyDictionary = WeakIdKeyDictionary()
# compiled: one dict per VeraModel forward, input tensor -> [(projection, A's shape and dtype, u)]; None outside
_SCOPE: Optional[dict] = None


def open_scope() -> Optional[dict]:
    """Start the memo of one compiled forward; returns what :func:`close_scope` restores."""
    global _SCOPE
    previous, _SCOPE = _SCOPE, {}
    return previous


def close_scope(previous: Optional[dict]) -> None:
    global _SCOPE
    _SCOPE = previous


def projected(x: Tensor, A: Tensor, projection: Optional[nn.Module]) -> Tensor:
    """``vera_project(x, A)`` (N, r), computed once for every caller with this x and the same slice of the same
    shared projection (A = ``projection``'s ``vera_A[:r, :in_features]`` in one dtype: equal slices taken for layers
    of different out_features are different tensor objects, so the slice is named by its owner, shape and dtype).
    ``projection`` None: an x of the caller's own (e.g. after its dropout), never shared."""
    if projection is None:
        return ops.vera_project(x, A)
    if torch.compiler.is_compiling():
        return _projected_in_scope(x, A, projection)
    key = (projection, A.shape, A.dtype, A._version, x._version, torch.is_grad_enabled(), ops.backward_count())
    entries = _EAGER.get(x)
    if entries is not None:
        for entry_key, u in entries:
            if entry_key[0] is projection and entry_key[1:] == key[1:]:
                return u
        # (an input held across steps: drop what earlier steps or versions left, so the list stays short)
        entries[:] = [e for e in entries if e[0][4:] == key[4:]]
    else:
        entries = _EAGER[x] = []
    u = ops.vera_project(x, A)
    entries.append((key, u))
    return u


def _projected_in_scope(x: Tensor, A: Tensor, projection: nn.Module) -> Tensor:
    scope = _SCOPE
    if scope is None:
        return ops.vera_project(x, A)
    entries = scope.get(x)
    if entries is not None:
        for owner, shape, dtype, u in entries:
            if owner is projection and shape == A.shape and dtype == A.dtype:
                return u
    else:
        entries = scope[x] = []
    u = ops.vera_project(x, A)
    entries.append((projection, A.shape, A.dtype, u))
    return u
