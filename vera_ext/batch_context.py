"""The per-sample adapters of a model-level mixed batch in progress, shared by the layers that read them
(vera_ext.layer, vera_ext.modules_to_save) and the code that sets them (vera_ext.mixed_batch).

A batch is given by its adapter names (a list of str, one per sample), by its slot indices (one int64 tensor on
the device, one entry per sample, -1: no adapter; docs/DESIGN.md §2.6), or both. The layers read the indices when
there are some (the bank path: no host work), else the names; modules_to_save wrappers need the names.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

__all__ = ["BATCH_ADAPTER_NAMES", "MixedBatch", "batch_adapter_names", "batch_adapter_indices"]


class MixedBatch(NamedTuple):
    names: Optional[list[str]]
    idx: Optional[Tensor]


# {id(receiving module): MixedBatch} for the call in progress. A context variable, so concurrent calls from several
# threads each see their own. Under torch.compile the batch travels as the module attributes
# ``_batch_adapter_names`` / ``_batch_adapter_idx`` instead (dynamo traces attribute reads, not context variables).
BATCH_ADAPTER_NAMES: ContextVar[Optional[dict]] = ContextVar("vera_ext_batch_adapter_names", default=None)


def _batch(module: nn.Module) -> Optional[MixedBatch]:
    current = BATCH_ADAPTER_NAMES.get()
    return None if current is None else current.get(id(module))


def batch_adapter_names(module: nn.Module) -> Optional[list[str]]:
    """The names a model-level mixed batch handed to ``module`` for the current call, or None."""
    if torch.compiler.is_compiling():
        return module._batch_adapter_names
    batch = _batch(module)
    return None if batch is None else batch.names


def batch_adapter_indices(module: nn.Module) -> Optional[Tensor]:
    """The slot indices (samples,) a model-level mixed batch handed to ``module`` for the current call, or None."""
    if torch.compiler.is_compiling():
        return getattr(module, "_batch_adapter_idx", None)
    batch = _batch(module)
    return None if batch is None else batch.idx
