"""Meta-device initialization: build and inject on ``torch.device("meta")``, then allocate and fill in one call.

    with torch.device("meta"):
        model = MyModel(config)                          # no memory, no init time
        vera = vera_ext.get_vera_model(model, vera_config)
    # (shard here, e.g. FSDP2's fully_shard, while everything is still on meta)
    vera_ext.materialize(vera, "cuda", base_state_dict=safetensors.torch.load_file("model.safetensors"))

``to_empty()`` gives every tensor memory but no values. VeRA's shared A/B are not trained and are usually not
checkpointed (``save_projection=False`` regenerates them from ``projection_prng_key``), so :func:`materialize`
draws them again from the key, bit-identically to eager injection, sets the lambdas as eager injection did, and
loads the base model's weights from a state dict of the *un-injected* model.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .layer import VeraLinear
from .model import VeraModel
from .projection import VeraProjection

__all__ = ["materialize", "base_key"]

# Segments the injection puts into a base model's parameter paths.
_WRAPPER_SEGMENTS = ("base_layer", "original_module")


def base_key(key: str) -> Optional[str]:
    """The key a parameter/buffer of an injected model had in the base model, or None for VeRA's own state
    (lambdas, projection). ``lin.base_layer.weight`` -> ``lin.weight``; a modules_to_save copy
    (``head.modules_to_save.<adapter>.weight``) and the original (``head.original_module.weight``) -> ``head.weight``.
    """
    parts = key.split(".")
    if any(p.startswith("vera_lambda_") or p == "vera_projection" for p in parts):
        return None
    out, i = [], 0
    while i < len(parts):
        if parts[i] in _WRAPPER_SEGMENTS:
            i += 1
        elif parts[i] == "modules_to_save" and i + 2 < len(parts):
            i += 2  # the segment after it is the adapter name
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def materialize(
    model: nn.Module,
    device: Union[str, torch.device],
    base_state_dict: Optional[Mapping[str, Tensor]] = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Allocate a model built on the meta device on ``device`` and initialize it as eager construction would.

    ``model`` is a :class:`~vera_ext.VeraModel`, a model holding :class:`~vera_ext.VeraLinear` layers, or one
    ``VeraLinear``. Steps: ``model.to_empty(device=device)``; every shared :class:`VeraProjection` is redrawn from
    its PRNG key (:meth:`VeraProjection.regenerate_`, bit-identical to eager init, PEFT's low-precision rounding
    included); every adapter's lambdas are set as at injection (:meth:`VeraLinear.reset_lambdas_`: with
    ``init_weights=True`` lambda_b = 0, lambda_d = d_initial; with ``init_weights=False`` they are redrawn from the
    global RNG, so equal to eager init only from the same RNG state); then, if given, ``base_state_dict`` (keys of
    the model *before* injection, e.g. the base checkpoint) is copied into the base weights, including every
    modules_to_save copy. With ``strict``, a base tensor the dict lacks or a dict key the model lacks raises
    KeyError. Trained lambdas are then loaded as usual (``load_adapter`` / ``from_pretrained`` / ``load_state_dict``).
    Returns ``model``.
    """
    model.to_empty(device=device)
    projections = {id(m): m for m in model.modules() if isinstance(m, VeraProjection)}
    for projection in projections.values():
        projection.regenerate_()
    for layer in model.modules():
        if isinstance(layer, VeraLinear):
            for name in layer.vera_lambda_d:
                layer.reset_lambdas_(name)
    if base_state_dict is not None:
        _load_base(model, base_state_dict, strict)
    return model


def _load_base(model: nn.Module, base_state_dict: Mapping[str, Tensor], strict: bool) -> None:
    inner, prefix = (model.model, "model.") if isinstance(model, VeraModel) else (model, "")
    targets = {}
    for key, tensor in inner.state_dict(keep_vars=True).items():
        source = base_key(key)
        if source is not None:
            targets.setdefault(source, []).append((prefix + key, tensor))
    if strict:
        missing = sorted(set(targets) - set(base_state_dict))
        unexpected = sorted(set(base_state_dict) - set(targets))
        if missing or unexpected:
            raise KeyError(
                f"base_state_dict does not match the base model: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''} (keys are those of the model before VeRA injection)"
            )
    with torch.no_grad():
        for source, destinations in targets.items():
            if source not in base_state_dict:
                continue
            value = base_state_dict[source]
            for key, tensor in destinations:
                if tensor.shape != value.shape:
                    raise ValueError(
                        f"base_state_dict[{source!r}] has shape {tuple(value.shape)}, but {key} is "
                        f"{tuple(tensor.shape)}"
                    )
                tensor.copy_(value)
