"""Mixed-adapter batches at model level: one adapter name per sample, handed to every VeRA layer for one call.

The names reach the layers and modules_to_save wrappers through a context variable (vera_ext.batch_context), so
concurrent calls on one model from several threads each see their own names. Under ``torch.compile`` they travel as
a module attribute set for the call instead, which traces with ``fullgraph=True`` (forward pre-hooks would not:
registering one bumps a class-level counter); the names are Python strings, so each distinct list compiles its own
graph, and one compiled mixed-batch call per model runs at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .batch_context import BATCH_ADAPTER_NAMES
from .layer import BASE_ADAPTER
from .modules_to_save import ModulesToSave

__all__ = ["check_adapter_names", "run_with_adapter_names"]

_BATCH_KWARGS = ("input_ids", "inputs_embeds", "x", "input", "hidden_states", "pixel_values")


def check_adapter_names(vera_model, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> list[str]:
    """``adapter_names`` as a list, after checking it against the model and the batch (TypeError/ValueError)."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str (one per sample), got {adapter_names!r}")
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in vera_model.peft_config})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Known adapters: "
            f"{list(vera_model.peft_config)} and {BASE_ADAPTER!r} (no adapter)"
        )
    if any(layer.merged for layer in vera_model.vera_layers().values()):
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    batch = _batch_tensor(args, kwargs)
    if batch is not None and batch.dim() > 0 and len(names) != batch.shape[0]:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {batch.shape[0]} respectively."
        )
    if vera_model.model.training and _checkpointing(vera_model.model):
        raise ValueError(
            "mixed-adapter batches cannot be trained with gradient checkpointing: the recomputed forward would "
            "not see `adapter_names`"
        )
    return names


def run_with_adapter_names(vera_model, names: list[str], call):
    """``call()`` with every VeRA layer and modules_to_save wrapper seeing ``names`` (checked) as its
    per-sample adapters; a layer without some adapter runs those samples on the base layer alone."""
    receivers = list(vera_model.vera_layers().values())
    receivers += [m for m in vera_model.model.modules() if isinstance(m, ModulesToSave)]
    if torch.compiler.is_compiling():
        for module in receivers:
            module._batch_adapter_names = names
        try:
            return call()
        finally:
            for module in receivers:
                module._batch_adapter_names = None
    token = BATCH_ADAPTER_NAMES.set({id(module): names for module in receivers})
    try:
        return call()
    finally:
        BATCH_ADAPTER_NAMES.reset(token)


def _checkpointing(model) -> bool:
    """transformers' activation (gradient) checkpointing flag, under its current or its older name."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _batch_tensor(args: tuple, kwargs: dict):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in _BATCH_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None
