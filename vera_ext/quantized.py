"""Quantized base layers: read a quantized weight as a dense one and write a dense weight back (docs/DESIGN.md §6.1).

A base layer is *quantized* when its ``weight`` is stored in a packed or integer form that the merge op cannot add
into. Every kind vera_ext supports has one :class:`QuantizedKind` here, with two operations:

- ``dequantize(base, dtype)``: a fresh dense (out, in) tensor (the layer's own dequantization), nothing changed;
- ``write(base, weight)``: quantize a dense (out, in) weight again with the layer's own settings and install it.

bitsandbytes and torchao stay optional: a kind is looked for only when its library is already imported (a layer of
that library cannot exist otherwise), so importing vera_ext never imports them.
"""

from __future__ import annotations

import abc
import copy
import sys
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED",
    "QuantizedKind",
    "quantization_of",
    "is_quantized",
    "dequantize_weight",
    "write_weight_",
    "quantize_linears",
]

#: What :func:`quantization_of` recognises, for error messages and the docs.
SUPPORTED = (
    "bitsandbytes Linear4bit (nf4 or fp4, with or without double quantization, any compute dtype)",
    "bitsandbytes Linear8bitLt (int8 weights, has_fp16_weights=False)",
    "torchao Int8Tensor weights (Int8WeightOnlyConfig)",
    "torchao IntxUnpackedToInt8Tensor weights (IntxWeightOnlyConfig, e.g. int4 with PerGroup)",
)

_FP16_MAX = torch.finfo(torch.float16).max


class QuantizedKind(abc.ABC):
    """One kind of quantized base layer. ``name`` says which; subclasses implement the three abstract methods."""

    name = ""

    @abc.abstractmethod
    def dequantize(self, base: nn.Module, dtype: torch.dtype) -> Tensor:
        """The layer's weight as a new dense (out_features, in_features) tensor in ``dtype``; changes nothing."""

    def check_writable(self, weight: Tensor) -> None:
        """Raise ValueError when quantizing ``weight`` again would store a non-finite value."""
        if not torch.isfinite(weight).all():
            raise ValueError("the weight to quantize again has non-finite values")

    @abc.abstractmethod
    def write(self, base: nn.Module, weight: Tensor) -> None:
        """Quantize the dense (out, in) ``weight`` with the layer's own settings and install it in ``base``; the
        layer stays the same type with the same settings. Nothing is installed if quantizing fails."""

    @abc.abstractmethod
    def settings(self, base: nn.Module) -> dict:
        """The quantization settings of ``base`` (what :meth:`write` keeps)."""


# ------------------------------------------------------------------------------------------------ bitsandbytes


class _Bnb4bit(QuantizedKind):
    name = "bitsandbytes Linear4bit"

    @staticmethod
    def _state(weight):
        """(packed data, quant state) in bitsandbytes' standard layout. bitsandbytes repacks a CPU weight for its
        AVX512-BF16 kernel on the first eval forward without grad; its own inverse, applied to copies, undoes that."""
        qs = weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(qs))
        return weight.data, qs

    def dequantize(self, base, dtype):
        import bitsandbytes as bnb

        data, qs = self._state(base.weight)
        return bnb.functional.dequantize_4bit(data, qs).to(dtype)

    def _stored_dtype(self, weight) -> torch.dtype:
        qs = weight.quant_state
        return getattr(qs, "original_dtype", qs.dtype) if getattr(qs, "packing_format_for_cpu", False) else qs.dtype

    def write(self, base, weight):
        import bitsandbytes as bnb

        old = base.weight
        new = bnb.nn.Params4bit(
            weight.detach().to(self._stored_dtype(old)).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        new = new.to(old.device)  # (quantizes: bnb_quantized is False)
        new.module = base
        base.weight = new
        base.quant_state = new.quant_state

    def settings(self, base):
        w = base.weight
        return {
            "quant_type": w.quant_type,
            "blocksize": w.blocksize,
            "compress_statistics": w.compress_statistics,
            "quant_storage": w.quant_storage,
            "dtype": self._stored_dtype(w),
            "compute_dtype": base.compute_dtype,
            "shape": tuple(w.quant_state.shape),
        }


class _Bnb8bit(QuantizedKind):
    name = "bitsandbytes Linear8bitLt"

    @staticmethod
    def _scb(base) -> Tensor:
        # (the first forward moves CB/SCB from the weight to the layer's state)
        scb = getattr(base.weight, "SCB", None)
        return base.state.SCB if scb is None else scb

    def dequantize(self, base, dtype):
        import bitsandbytes as bnb

        data = base.weight.data
        return bnb.functional.int8_vectorwise_dequant(data, self._scb(base).to(data.device)).to(dtype)

    def check_writable(self, weight):
        # bitsandbytes quantizes from fp16: a value beyond fp16's range would become inf.
        super().check_writable(weight)
        if weight.numel() and weight.abs().max().item() > _FP16_MAX:
            raise ValueError(
                f"the weight to quantize again exceeds fp16's range ({_FP16_MAX}), which int8 goes through"
            )

    def write(self, base, weight):
        import bitsandbytes as bnb

        old = base.weight
        new = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
        new = new.to(old.device)  # (quantizes: the data is not int8 yet)
        base.weight = new
        base.state.reset_grads()

    def settings(self, base):
        return {
            "threshold": base.state.threshold,
            "has_fp16_weights": base.state.has_fp16_weights,
            "dtype": base.weight.dtype,
            "shape": tuple(base.weight.shape),
        }


# ------------------------------------------------------------------------------------------------ torchao


class _TorchaoWeightOnly(QuantizedKind):
    """torchao weight-only tensors; quantized again through ``torchao.quantize_`` with the config the tensor's own
    attributes describe."""

    def __init__(self, name: str, config):
        self.name = name
        self.config = config

    def dequantize(self, base, dtype):
        return base.weight.dequantize().to(dtype)

    def write(self, base, weight):
        from torchao.quantization import quantize_

        old = base.weight
        scratch = nn.Linear(old.shape[1], old.shape[0], bias=False, device="meta")
        scratch.weight = nn.Parameter(weight.detach().to(old.device, old.dtype).contiguous(), requires_grad=False)
        quantize_(scratch, copy.deepcopy(self.config))
        base.weight = nn.Parameter(scratch.weight.data, requires_grad=False)

    def settings(self, base):
        return {"config": repr(self.config), "type": type(base.weight).__name__, "dtype": base.weight.dtype}


def _torchao_kind(weight) -> Optional[QuantizedKind]:
    """The kind of a torchao weight, its config recovered from the tensor's attributes; None if not supported."""
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, IntxUnpackedToInt8Tensor, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    out_f, in_f = weight.shape
    if type(weight) is Int8Tensor:
        plain = (
            weight.act_quant_kwargs is None
            and getattr(weight, "act_quant_scale", None) is None
            and getattr(weight, "act_pre_scale", None) is None
            and not getattr(weight, "reduce_range", False)
        )
        zp = getattr(weight, "zero_point", None)
        block = list(weight.block_size)
        granularity = {(1, in_f): PerRow(), (out_f, in_f): PerTensor()}.get(tuple(block))
        if not plain or granularity is None or (zp is not None and bool(zp.any())):
            return None
        config = Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
        return _TorchaoWeightOnly("torchao Int8Tensor (weight-only int8)", config)
    if type(weight) is IntxUnpackedToInt8Tensor:
        if weight.activation_quantization is not None:
            return None
        block = tuple(weight.block_size)
        if block == (1, in_f):
            granularity = PerAxis(0)
        elif block[0] == 1:
            granularity = PerGroup(block[1])
        else:
            return None
        mapping = MappingType.ASYMMETRIC if bool(weight.zero_point.any()) else MappingType.SYMMETRIC
        scale_dtype = None if weight.scale.dtype == weight.dtype else weight.scale.dtype
        config = IntxWeightOnlyConfig(
            weight_dtype=weight.target_dtype, granularity=granularity, mapping_type=mapping, scale_dtype=scale_dtype
        )
        return _TorchaoWeightOnly(f"torchao IntxUnpackedToInt8Tensor ({weight.target_dtype} weight-only)", config)
    return None


# ------------------------------------------------------------------------------------------------ lookup


def quantization_of(base: nn.Module) -> Optional[QuantizedKind]:
    """The :class:`QuantizedKind` of ``base``'s weight, or None when the weight is a plain floating-point tensor
    (nothing to dequantize). Raises TypeError, naming the layer and weight types and listing :data:`SUPPORTED`,
    for a quantized weight of a kind not supported here (integer storage, or a torchao tensor of another kind)."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if sys.modules.get("bitsandbytes") is not None:
        import bitsandbytes as bnb

        if isinstance(base, bnb.nn.Linear4bit) and isinstance(weight, bnb.nn.Params4bit):
            return _Bnb4bit() if weight.bnb_quantized else None
        if isinstance(base, bnb.nn.Linear8bitLt) and weight.dtype == torch.int8:
            return _Bnb8bit()
    torchao_tensor = False
    if sys.modules.get("torchao") is not None:
        from torchao.utils import TorchAOBaseTensor

        torchao_tensor = isinstance(weight, TorchAOBaseTensor)
        if torchao_tensor and weight.dim() == 2:
            kind = _torchao_kind(weight)
            if kind is not None:
                return kind
    if torchao_tensor or not (weight.dtype.is_floating_point or weight.dtype.is_complex):
        raise TypeError(
            f"base layer {type(base).__name__} has a quantized weight of a kind vera_ext cannot dequantize "
            f"({type(weight).__name__}, dtype {weight.dtype}); supported: {'; '.join(SUPPORTED)}"
        )
    return None


def is_quantized(base: nn.Module) -> bool:
    """Whether ``base``'s weight is quantized (of a supported kind or not): its own forward must compute it."""
    try:
        return quantization_of(base) is not None
    except TypeError:
        return True


def dequantize_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """``base``'s weight as a new dense (out_features, in_features) tensor in ``dtype``: dequantized for a
    quantized layer, a copy otherwise. Changes nothing. TypeError for an unsupported quantized kind."""
    kind = quantization_of(base)
    if kind is None:
        return base.weight.detach().to(dtype, copy=True)
    return kind.dequantize(base, dtype)


def write_weight_(base: nn.Module, weight: Tensor) -> None:
    """Install the dense (out_features, in_features) ``weight`` in the quantized layer ``base``, quantized again
    with the layer's own settings. ValueError (and nothing changed) when ``weight`` has the wrong shape or a value
    that would not quantize to a finite one; TypeError when ``base`` is not a supported quantized layer."""
    kind = quantization_of(base)
    if kind is None:
        raise TypeError(f"base layer {type(base).__name__} is not quantized; assign its weight directly")
    _check_dense_weight(base, weight)
    kind.check_writable(weight)
    kind.write(base, weight)


def _check_dense_weight(base: nn.Module, weight: Tensor) -> None:
    shape = (base.out_features, base.in_features)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != shape or not weight.dtype.is_floating_point:
        got = f"{type(weight).__name__} {tuple(weight.shape)} {weight.dtype}" if isinstance(weight, Tensor) else weight
        raise ValueError(f"weight must be a floating-point tensor of shape {shape} (out, in), got {got}")


# ------------------------------------------------------------------------------------------------ quantizing models

_KINDS = ("nf4", "fp4", "int8", "torchao_int8", "torchao_int4")


def quantize_linears(
    model: nn.Module,
    kind: str,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    compress_statistics: bool = True,
    blocksize: int = 64,
    threshold: float = 0.0,
    group_size: int = 32,
    skip: tuple = (),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place; also returned) by a quantized one holding its weights.

    ``kind``: "nf4" / "fp4" (bitsandbytes ``Linear4bit`` with ``compute_dtype``, ``compress_statistics`` (double
    quantization) and ``blocksize``), "int8" (bitsandbytes ``Linear8bitLt``, ``threshold``), "torchao_int8"
    (torchao ``Int8WeightOnlyConfig``) or "torchao_int4" (torchao ``IntxWeightOnlyConfig``, int4 in groups of
    ``group_size``).
    Layers whose qualified name ends with an entry of ``skip`` (e.g. ``("lm_head",)``) are left alone. The weights
    are quantized on the layers' current device (bitsandbytes' CPU backend works without a GPU)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    if kind.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        if kind == "torchao_int8":
            config = Int8WeightOnlyConfig(set_inductor_config=False)
        else:
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
        for name in names:
            quantize_(model.get_submodule(name), config)
        return model
    import bitsandbytes as bnb

    for name in names:
        lin = model.get_submodule(name)
        device, data = lin.weight.device, lin.weight.detach().clone()  # (the weight's own dtype is kept)
        bias = lin.bias is not None
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias, has_fp16_weights=False, threshold=threshold
            )
            q.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias,
                compute_dtype=compute_dtype,
                compress_statistics=compress_statistics,
                quant_type=kind,
            )
            q.weight = bnb.nn.Params4bit(
                data,
                requires_grad=False,
                blocksize=blocksize,
                compress_statistics=compress_statistics,
                quant_type=kind,
                module=q,
            )
        if bias:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
        q = q.to(device)  # (quantizes)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model
