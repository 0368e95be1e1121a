"""Mixed-adapter batches at model level: one adapter name per sample, passed to every VeRA layer for one call."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Sequence

import torch

from .layer import BASE_ADAPTER
from .modules_to_save import ModulesToSave

__all__ = ["mixed_batch_hooks"]

_BATCH_KWARGS = ("input_ids", "inputs_embeds", "x", "input", "hidden_states", "pixel_values")


def _inject(module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


@contextmanager
def mixed_batch_hooks(vera_model, adapter_names: Sequence[str], args: tuple, kwargs: dict):
    """Check ``adapter_names`` and, for the duration, hand each VeRA layer (and modules_to_save wrapper) its
    per-sample names; a layer without some adapter runs those samples on the base layer alone."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str (one per sample), got {adapter_names!r}")
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in vera_model.peft_config})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Known adapters: "
            f"{list(vera_model.peft_config)} and {BASE_ADAPTER!r} (no adapter)"
        )
    layers = vera_model.vera_layers()
    if any(layer.merged for layer in layers.values()):
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
    handles = []
    try:
        for layer in layers.values():
            own = [n if n in layer.vera_lambda_d else BASE_ADAPTER for n in names]
            handles.append(layer.register_forward_pre_hook(partial(_inject, names=own), with_kwargs=True))
        for module in vera_model.model.modules():
            if isinstance(module, ModulesToSave):
                handles.append(module.register_forward_pre_hook(partial(_inject, names=names), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
