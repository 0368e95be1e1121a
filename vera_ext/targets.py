"""Which modules a VeraConfig adapts, matched exactly as PEFT 0.21.2 matches them, and how big they are."""

from __future__ import annotations

import re
from typing import Optional

from torch import Tensor, nn

from .config import VeraConfig

__all__ = ["is_conv1d", "in_out_features", "matches_target", "matches_module_to_save", "resolve_target_modules"]

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (weight stored (in, out)), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def in_out_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a module VeRA can adapt, or None."""
    if is_conv1d(module):
        weight = module.weight
        shape = getattr(weight, "ds_shape", weight.shape)
        return int(shape[0]), int(shape[1])
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        i, o = module.in_features, module.out_features
        if isinstance(i, int) and isinstance(o, int):
            return i, o
    return None


def matches_module_to_save(config: VeraConfig, key: str) -> bool:
    """PEFT never adapts a module named in ``modules_to_save`` (or anything inside one)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or ())


def matches_target(config: VeraConfig, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for VeRA: a regex string must match the whole path; a list entry
    matches the path itself or a ``.name`` suffix, then ``layers_to_transform``/``layers_pattern`` filter the
    suffix matches by the first numbered path segment."""
    if matches_module_to_save(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indices = config.layers_to_transform
    if indices is None or (isinstance(indices, list) and not indices):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indices if isinstance(indices, int) else index in indices


def resolve_target_modules(config: VeraConfig, model: nn.Module, adapted: frozenset = frozenset()) -> None:
    """Expand ``target_modules="all-linear"`` in place, as PEFT does: every nn.Linear and Conv1D (and every layer
    already adapted, paths in ``adapted``, but nothing inside one) except the output embedding of a transformers
    model (and the classifier head of a SEQ_CLS model)."""
    if config.target_modules is None:
        raise ValueError(
            "target_modules must be given (a list of module names or a regex string); vera_ext does not guess them "
            "from the model type"
        )
    if not (isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR):
        return
    inside = tuple(f"{path}." for path in adapted)
    names = {
        name
        for name, module in model.named_modules()
        if name in adapted or ((isinstance(module, nn.Linear) or is_conv1d(module)) and not name.startswith(inside))
    }
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output_embedding = get_output() if callable(get_output) and hasattr(model, "config") else None
    if output_embedding is not None:
        excluded |= {name for name, module in model.named_modules() if module is output_embedding}
    elif config.task_type == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            module = getattr(model, head, None)
            if isinstance(module, nn.Module):
                excluded |= {name for name, m in model.named_modules() if m is module}
                break
    config.target_modules = names - excluded


def base_dtype_device(module: nn.Module):
    """The (dtype, device) PEFT moves an adapter to: the base layer's ``weight`` (or ``qweight``)."""
    for name in ("weight", "qweight"):
        weight = getattr(module, name, None)
        if isinstance(weight, Tensor):
            dtype = getattr(module, "compute_dtype", None) or weight.dtype
            return dtype, weight.device
    return None, None
