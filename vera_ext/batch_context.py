"""The per-sample adapter names of a model-level mixed batch in progress, shared by the layers that read them
(vera_ext.layer, vera_ext.modules_to_save) and the code that sets them (vera_ext.mixed_batch)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

import torch
from torch import nn

__all__ = ["BATCH_ADAPTER_NAMES", "batch_adapter_names"]

# {id(receiving module): names} for the call in progress. A context variable, so concurrent calls from several
# threads each see their own. Under torch.compile the names travel as the module attribute
# ``_batch_adapter_names`` instead (dynamo traces attribute reads, not context variables).
BATCH_ADAPTER_NAMES: ContextVar[Optional[dict]] = ContextVar("vera_ext_batch_adapter_names", default=None)


def batch_adapter_names(module: nn.Module) -> Optional[list[str]]:
    """The names a model-level mixed batch handed to ``module`` for the current call, or None."""
    if torch.compiler.is_compiling():
        return module._batch_adapter_names
    current = BATCH_ADAPTER_NAMES.get()
    return None if current is None else current.get(id(module))
