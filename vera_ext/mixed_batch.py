"""Mixed-adapter batches at model level: one adapter per sample, handed to every VeRA layer for one call.

A batch is given by names (``adapter_names``) or by the index tensor ``VeraModel.adapter_indices(names)`` returns
(``adapter_indices``): one int64 slot per sample on the layers' device, -1 for none, the same slot for an adapter
in every layer (docs/DESIGN.md §2.6). Names are turned into that tensor once per model call, unless the call needs
gradients for the lambdas of the adapters it uses (the tables are not the Parameters autograd tracks): then the
layers get the names and stack those adapters' lambdas as before.

The batch reaches the layers and modules_to_save wrappers through a context variable (vera_ext.batch_context), so
concurrent calls on one model from several threads each see their own. Under ``torch.compile`` it travels as module
attributes set for the call instead, which trace with ``fullgraph=True`` (forward pre-hooks would not: registering
one bumps a class-level counter). Names are Python strings, so each distinct list compiles its own graph; an index
tensor is a graph input, so one graph serves every mix of adapters. One compiled mixed-batch call per model runs at
a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .batch_context import BATCH_ADAPTER_NAMES, MixedBatch
from .layer import BASE_ADAPTER, VeraLinear
from .modules_to_save import ModulesToSave

__all__ = [
    "check_adapter_names",
    "check_adapter_indices",
    "lambdas_need_grad",
    "slot_indices",
    "run_mixed_batch",
    "run_with_adapter_names",
    "receivers",
]

_BATCH_KWARGS = ("input_ids", "inputs_embeds", "x", "input", "hidden_states", "pixel_values")


def receivers(vera_model) -> tuple[list, list]:
    """(VeRA layers, modules_to_save wrappers) of the model, found in one walk of its modules."""
    layers, wrappers = [], []
    for module in vera_model.model.modules():
        if isinstance(module, VeraLinear):
            layers.append(module)
        elif isinstance(module, ModulesToSave):
            wrappers.append(module)
    return layers, wrappers


def check_adapter_names(
    vera_model, adapter_names: Sequence[str], args: tuple, kwargs: dict, found: Optional[tuple] = None
) -> list[str]:
    """``adapter_names`` as a list, after checking it against the model and the batch (TypeError/ValueError).
    ``found``: :func:`receivers` of the model, when the caller has them."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str (one per sample), got {adapter_names!r}")
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in vera_model.peft_config})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Known adapters: "
            f"{list(vera_model.peft_config)} and {BASE_ADAPTER!r} (no adapter)"
        )
    _check_unmerged(found or receivers(vera_model), "adapter_names")
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


def check_adapter_indices(
    vera_model, adapter_indices, args: tuple, kwargs: dict, found: Optional[tuple] = None
) -> torch.Tensor:
    """``adapter_indices`` (from :meth:`VeraModel.adapter_indices`) checked against the model and the batch by its
    type, dtype, shape and device only: its values are not read (that would be a host synchronization; the ops
    refuse an out-of-range slot, on CUDA's decode path with a device-side assert, §2.6)."""
    if not isinstance(adapter_indices, torch.Tensor):
        raise TypeError(
            "adapter_indices must be the int64 tensor VeraModel.adapter_indices(names) returns, got "
            f"{type(adapter_indices).__name__}"
        )
    if adapter_indices.dtype != torch.int64 or adapter_indices.dim() != 1:
        raise ValueError(
            "adapter_indices must be a 1-D int64 tensor (one slot per sample, -1: no adapter), got "
            f"{adapter_indices.dtype} of shape {tuple(adapter_indices.shape)}"
        )
    found = found or receivers(vera_model)
    _check_unmerged(found, "adapter_indices")
    if found[1]:
        raise ValueError(
            "adapter_indices cannot route modules_to_save (they pick a module per sample by name): pass adapter_names"
        )
    batch = _batch_tensor(args, kwargs)
    if batch is not None and batch.dim() > 0 and adapter_indices.shape[0] != batch.shape[0]:
        raise ValueError(
            "Length of `adapter_indices` should be the same as the number of inputs, but got "
            f"{adapter_indices.shape[0]} and {batch.shape[0]} respectively."
        )
    return adapter_indices


def slot_indices(vera_model, names: list[str], device) -> torch.Tensor:
    """The slots of checked ``names`` (-1 for "__base__") as one int64 tensor on ``device``: one host list, one
    copy (from pinned memory, non-blocking, to a CUDA device)."""
    slots = vera_model._adapter_slots.slots
    idx = torch.tensor([-1 if n == BASE_ADAPTER else slots.get(n, -1) for n in names], dtype=torch.int64)
    if device is None or torch.device(device).type == "cpu":
        return idx
    if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
        idx = idx.pin_memory()
    return idx.to(device, non_blocking=True)


def lambdas_need_grad(vera_model, names: list[str], found: Optional[tuple] = None) -> bool:
    """Whether this call must give the lambdas of the adapters in ``names`` a gradient (then the layers take the
    names and stack those adapters' Parameters; the bank's tables are read without gradients)."""
    if not torch.is_grad_enabled():
        return False
    used = {n for n in names if n != BASE_ADAPTER}
    for layer in (found or receivers(vera_model))[0]:
        ld, lb = layer.vera_lambda_d, layer.vera_lambda_b
        for n in used:
            if n in ld and (ld.requires_grad_of(n) or lb.requires_grad_of(n)):
                return True
    return False


def run_mixed_batch(vera_model, batch: MixedBatch, call, found: Optional[tuple] = None):
    """``call()`` with every VeRA layer and modules_to_save wrapper seeing ``batch`` (checked) as its per-sample
    adapters; a layer without some adapter runs those samples on the base layer alone."""
    layers, wrappers = found or receivers(vera_model)
    targets = layers + wrappers
    if torch.compiler.is_compiling():
        for module in targets:
            module._batch_adapter_names = batch.names
            module._batch_adapter_idx = batch.idx
        try:
            return call()
        finally:
            for module in targets:
                module._batch_adapter_names = None
                module._batch_adapter_idx = None
    token = BATCH_ADAPTER_NAMES.set({id(module): batch for module in targets})
    try:
        return call()
    finally:
        BATCH_ADAPTER_NAMES.reset(token)


def run_with_adapter_names(vera_model, names: list[str], call, found: Optional[tuple] = None):
    """``call()`` with every VeRA layer and modules_to_save wrapper seeing ``names`` (checked) as its
    per-sample adapters (the layers read the bank's tables by slot unless the lambdas need gradients)."""
    found = found or receivers(vera_model)
    device = found[0][0]._bank.lambda_b_table.device if found[0] else None
    idx = None if lambdas_need_grad(vera_model, names, found) else slot_indices(vera_model, names, device)
    return run_mixed_batch(vera_model, MixedBatch(names, idx), call, found)


def _check_unmerged(found: tuple, what: str) -> None:
    if any(layer.merged for layer in found[0]):
        raise ValueError(f"Cannot pass `{what}` when there are merged adapters, please call `unmerge_adapter` first.")


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
