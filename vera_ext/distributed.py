"""Settings for training VeRA under PyTorch's DDP and FSDP2.

The shared projection A/B (:class:`~vera_ext.VeraProjection` buffers) is drawn from a PRNG key, so every rank
already holds the same A/B by construction; only the lambdas (fp32 ``nn.Parameter`` s) need gradient reduction.

* DDP: :func:`ddp_ignore_projection` before wrapping keeps DDP from broadcasting A/B (at init and before every
  forward); every other buffer keeps DDP's default treatment.
* FSDP2: :func:`fully_shard_vera_layers` before your own ``fully_shard`` calls keeps the lambdas fp32 in forward and
  backward under a low-precision ``MixedPrecisionPolicy`` (FSDP2 casts every parameter of a group to
  ``param_dtype``; it has no per-parameter dtype). :func:`fsdp_unsharded` makes a sharded model whole for
  ``save_pretrained`` (which cannot read sharded DTensor lambdas).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .layer import VeraLinear
from .projection import VeraProjection

__all__ = ["ddp_ignore_projection", "fsdp_unsharded", "fully_shard_vera_layers", "projection_buffer_names"]


def projection_buffer_names(module: nn.Module) -> list[str]:
    """Fully qualified names, relative to ``module``, of every :class:`VeraProjection` buffer (``vera_A``,
    ``vera_B``), under every path that reaches them: a shared projection is a submodule of every VeraLinear and of
    the VeraModel, and DDP filters buffers by whichever name ``named_buffers()`` yields first."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    names = []
    for path, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, VeraProjection):
            prefix = f"{path}." if path else ""
            names += [prefix + buffer for buffer in sub._buffers if sub._buffers[buffer] is not None]
    return names


def ddp_ignore_projection(module: nn.Module) -> list[str]:
    """Tell DDP to leave the shared VeRA projection alone; call on the module you pass to
    ``DistributedDataParallel``, before wrapping it. Returns the buffer names now ignored.

    DDP broadcasts every buffer from rank 0 at construction and, by default, again before every forward. A/B are
    identical on every rank already (generated from ``projection_prng_key`` or loaded from the same checkpoint), so
    that is only traffic: ``R * (I_max + O_max)`` elements per step. Unlike ``forward_sync_buffers=False`` (or the
    deprecated ``broadcast_buffers=False``), this leaves other buffers (e.g. BatchNorm statistics in
    ``modules_to_save``) synchronised, and skips the init broadcast of A/B too. Names already on DDP's ignore list
    stay there. Uses DDP's ``_set_params_and_buffers_to_ignore_for_model`` (documented in its docstring as the
    way to do this until a public API exists)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        raise TypeError(
            "module is already wrapped in DistributedDataParallel: call ddp_ignore_projection(model) before "
            "DistributedDataParallel(model), which reads the ignore list only at construction"
        )
    names = projection_buffer_names(module)
    if not names:
        raise ValueError(f"module ({type(module).__name__}) holds no VeraProjection: there is nothing to ignore")
    setter = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is None:
        raise RuntimeError(
            f"this torch ({torch.__version__}) has no DistributedDataParallel._set_params_and_buffers_to_ignore_"
            "for_model; pass forward_sync_buffers=False (or broadcast_buffers=False on torch < 2.13) to DDP instead"
        )
    already = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    setter(module, already + [n for n in names if n not in already])
    return names


def fully_shard_vera_layers(module: nn.Module, *, mp_policy=None, **fully_shard_kwargs) -> list[VeraLinear]:
    """Apply FSDP2's ``fully_shard`` to every :class:`VeraLinear` in ``module`` so their lambdas stay fp32; then
    call ``fully_shard`` on your blocks and the root as usual (bottom-up: these groups are the innermost).

    ``mp_policy`` is the ``MixedPrecisionPolicy`` you use for the rest of the model. When its ``param_dtype`` is
    a low-precision dtype, each base layer becomes its own group under ``mp_policy`` (its weight is cast as
    everywhere else) and the VeraLinear's group, which then holds only the lambdas, casts nothing: the lambdas
    are all-gathered, used and their gradients reduced in fp32. Otherwise each VeraLinear is one group (base
    layer and lambdas) under that no-cast policy. ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``,
    ...) go to every call. Returns the layers sharded.

    A base layer that is its own FSDP group has forward hooks, so the layer runs the unfused path (base forward,
    then the adapter op). The cheaper alternative for a frozen base: store it in bf16 and shard with
    ``param_dtype=None``; FSDP2 then casts nothing, the lambdas are already fp32 and no extra groups are needed.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    if not isinstance(policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {type(policy).__name__}")
    layers = [m for m in module.modules() if isinstance(m, VeraLinear)]
    if not layers:
        raise ValueError(f"module ({type(module).__name__}) holds no VeraLinear layer to shard")
    # param_dtype=None and reduce_dtype=None: FSDP2 all-gathers, computes with and reduces each lambda in its own
    # dtype (fp32). Inputs are not cast: the base layer's group casts them where a cast is wanted.
    lambda_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None, cast_forward_inputs=False)
    low_precision = _is_low_precision(policy.param_dtype)
    for layer in layers:
        if low_precision:
            fully_shard(layer.base_layer, mp_policy=policy, **fully_shard_kwargs)
        fully_shard(layer, mp_policy=lambda_policy, **fully_shard_kwargs)
    return layers


@contextmanager
def fsdp_unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every FSDP2 group of ``module`` holds its whole parameters as plain tensors, so
    ``save_pretrained`` (on one rank) writes the full lambdas; they are resharded on exit. It all-gathers: enter it
    on every rank. Parameters come out in the group's ``param_dtype`` (fp32 lambdas under
    :func:`fully_shard_vera_layers`).

        with fsdp_unsharded(model):
            if dist.get_rank() == 0:
                model.save_pretrained(path)
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not groups:
        raise ValueError(f"module ({type(module).__name__}) has no FSDP2 group: call fully_shard on it first")
    for group in groups:
        group.unshard()
    try:
        yield module
    finally:
        for group in groups:
            group.reshard()


def _is_low_precision(dtype: Optional[torch.dtype]) -> bool:
    return dtype is not None and dtype.is_floating_point and torch.finfo(dtype).bits < 32
