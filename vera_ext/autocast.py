"""Autocast rules for the forward ops: they compute in the autocast dtype, as ``nn.Linear`` does, with fp32 lambdas.

Inside ``torch.autocast(device_type, dtype)`` a GEMM such as ``F.linear`` casts its floating-point operands to the
autocast dtype. ``vera_forward`` and ``vera_linear_forward`` are GEMMs too, so they follow the same rule: ``x``,
``base_out`` / ``weight`` / ``bias`` and the projection slices ``A``/``B`` are cast to the autocast dtype; the
lambdas are *not* (the kernels keep VeRA's scaling vectors in fp32, as PEFT does) and ``adapter_idx`` is an index.
Like autocast itself, only tensors on the autocast's device that are fp32/fp16/bf16 are cast (fp64 is left alone).

``torch.library.register_autocast`` would cast the lambdas as well, so the kernels are registered here by hand:
one Python kernel per op on the ``Autocast<Device>`` dispatch key, which casts and redispatches below autocast.
Because it is a dispatcher kernel, it also applies when the ops are traced by ``torch.compile``. The backward op
needs no rule: its inputs already share one dtype. ``vera_delta_weight`` and ``vera_merge_`` take explicit dtypes
and are left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (the ops must exist before kernels are added to them)

__all__ = ["AUTOCAST_DEVICE_TYPES", "CAST_ARGUMENTS", "autocast_dtype", "autocast_enabled"]

#: Device types that get an autocast rule.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

#: Positions of the arguments each op casts to the autocast dtype (the rest: lambdas, adapter_idx, are kept).
CAST_ARGUMENTS = {
    "vera_forward": (0, 1, 2, 3),  # x, base_out, A, B
    "vera_linear_forward": (0, 1, 2, 3, 4),  # x, weight, bias, A, B
    "vera_project": (0, 1),  # x, A
    "vera_apply": (0, 1, 2, 3),  # u, base_out, A, B
    "vera_linear_apply": (0, 1, 2, 3, 4, 5),  # x, u, weight, bias, A, B
}


def _eligible(t, device_type: str) -> bool:
    # autocast's own rule (aten/src/ATen/autocast_mode.h, is_eligible): floating point, not fp64, on its device.
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, and False for a device type autocast does not know (``meta``,
    where torch raises): a model on the meta device runs its forward for shapes, as ``nn.Linear`` does."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype a GEMM on ``t`` computes in right now: the autocast dtype when autocast is on for ``t``'s device
    and ``t`` is eligible, else ``t.dtype``."""
    device_type = t.device.type
    if autocast_enabled(device_type) and _eligible(t, device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _make_kernel(op, positions: tuple, device_type: str, key: str):
    below_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [
            a.to(dtype) if i in positions and _eligible(a, device_type) and a.dtype != dtype else a
            for i, a in enumerate(args)
        ]
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            return op(*cast)

    return kernel


def _register() -> torch.library.Library:
    lib = torch.library.Library("vera_ext", "FRAGMENT")
    for device_type in AUTOCAST_DEVICE_TYPES:
        if not torch._C._is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        for name, positions in CAST_ARGUMENTS.items():
            op = getattr(torch.ops.vera_ext, name).default
            lib.impl(name, _make_kernel(op, positions, device_type, key), key)
    return lib


_LIBRARY = _register()  # kept alive: the registrations last as long as this object
