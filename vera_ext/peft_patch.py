"""patch_peft(): PEFT's own VeRA layers run their forward, merge, unmerge and delta weight through vera_ext's ops.

The patched methods keep PEFT's semantics step by step (active adapters summed, input cast to the lambdas' dtype,
dropout per adapter, result cast back, merge bookkeeping and messages); only the arithmetic moves to our kernels:
no N x O temporaries in the forward, fp32 accumulation with one rounding in merges.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import ops, quantized
from .precision import opmath_dtype

__all__ = ["patch_peft", "unpatch_peft", "is_peft_patched"]

_PATCHED = ("forward", "merge", "unmerge", "get_delta_weight")
_originals: dict = {}


def _peft_linear():
    try:
        from peft.tuners.vera.layer import Linear
    except ImportError as err:
        raise ImportError(f"patch_peft needs PEFT's VeRA (pip install peft): {err}") from None
    return Linear


def patch_peft() -> None:
    """Route every PEFT VeRA ``Linear`` (existing and future instances) through vera_ext. Idempotent."""
    if _originals:
        return
    linear = _peft_linear()
    replacements = {"forward": _forward, "merge": _merge, "unmerge": _unmerge, "get_delta_weight": _get_delta_weight}
    for name in _PATCHED:
        _originals[name] = linear.__dict__[name]
    for name in _PATCHED:
        setattr(linear, name, replacements[name])


def unpatch_peft() -> None:
    """Put PEFT's own methods back, exactly as they were. A no-op when not patched."""
    if not _originals:
        return
    linear = _peft_linear()
    for name in _PATCHED:
        setattr(linear, name, _originals[name])
    _originals.clear()


def is_peft_patched() -> bool:
    return bool(_originals)


def _operands(layer, adapter: str, dtype: torch.dtype, device: torch.device):
    """PEFT's slices ``vera_A[:, :in]`` and ``vera_B[:out, :]`` in ``dtype`` on ``device``, lambdas in op-math."""
    A = layer.vera_A[adapter][:, : layer.in_features].to(device, dtype)
    B = layer.vera_B[adapter][: layer.out_features, :].to(device, dtype)
    lam = opmath_dtype(dtype)
    return A, B, layer.vera_lambda_d[adapter].to(device, lam), layer.vera_lambda_b[adapter].to(device, lam)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    previous_dtype = x.dtype
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
    elif self.merged:
        result = self.base_layer(x, *args, **kwargs)
    else:
        result = self.base_layer(x, *args, **kwargs)
        orig_dtype = result.dtype
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.vera_lambda_d.keys():
                continue
            lambda_d = self.vera_lambda_d[active_adapter]
            x = self._cast_input_dtype(x, lambda_d.dtype)
            # PEFT adds an adapter term computed in the promoted dtype of x, lambdas and projection to the result
            dtype = torch.promote_types(torch.promote_types(x.dtype, lambda_d.dtype), self.vera_A[active_adapter].dtype)
            dtype = torch.promote_types(dtype, result.dtype)
            A, B, ld, lb = _operands(self, active_adapter, dtype, x.device)
            x_d = self.vera_dropout[active_adapter](x).to(dtype)
            result = ops.vera_forward(x_d, result.to(dtype), A, B, ld, lb)
        result = result.to(orig_dtype)
    return result.to(previous_dtype)


def _get_delta_weight(self, adapter: str) -> torch.Tensor:
    lambda_d = self.vera_lambda_d[adapter]
    dtype = self.vera_B[adapter].dtype
    A, B, ld, lb = _operands(self, adapter, self.vera_A[adapter].dtype, lambda_d.device)
    return ops.vera_delta_weight(A, B, ld, lb, self.fan_in_fan_out, dtype)


def _merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    from peft.tuners.tuners_utils import check_adapters_to_merge

    adapter_names = check_adapters_to_merge(self, adapter_names)
    for active_adapter in adapter_names or ():
        if active_adapter not in self.vera_lambda_d.keys():
            continue
        if self.quantization_backend is not None:
            _merge_quantized(self, active_adapter, 1.0, bool(safe_merge))
        else:
            weight = self.get_base_layer().weight.data
            A, B, ld, lb = _operands(self, active_adapter, self.vera_A[active_adapter].dtype, weight.device)
            try:
                ops.vera_merge_(weight, A, B, ld, lb, 1.0, self.fan_in_fan_out, bool(safe_merge))
            except ValueError:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken"
                ) from None
        self.merged_adapters.append(active_adapter)


def _unmerge(self) -> None:
    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    while len(self.merged_adapters) > 0:
        active_adapter = self.merged_adapters.pop()
        if active_adapter not in self.vera_lambda_d.keys():
            continue
        if self.quantization_backend is not None:
            _merge_quantized(self, active_adapter, -1.0, False)
        else:
            weight = self.get_base_layer().weight.data
            A, B, ld, lb = _operands(self, active_adapter, self.vera_A[active_adapter].dtype, weight.device)
            ops.vera_merge_(weight, A, B, ld, lb, -1.0, self.fan_in_fan_out, False)


def _merge_quantized(self, adapter: str, alpha: float, safe: bool) -> None:
    """A quantized base (PEFT's quantization backend): PEFT's dequantized weight, alpha * delta_W added to an fp32
    copy of it with the merge op, then rounded to the dequantized weight's dtype and handed to PEFT's backend,
    which quantizes it again (docs/DESIGN.md §6.1). A refused safe merge hands nothing back."""
    weight = self.get_base_weight()
    dense = weight.to(torch.float32, copy=True)
    A, B, ld, lb = _operands(self, adapter, self.vera_A[adapter].dtype, dense.device)
    try:
        ops.vera_merge_(dense, A, B, ld, lb, alpha, self.fan_in_fan_out, safe)
        merged = dense.to(weight.dtype)
        if safe:
            if not torch.isfinite(merged).all():
                raise ValueError("a merged value is not finite in the dequantized weight's dtype")
            try:
                kind = quantized.quantization_of(self.get_base_layer())
            except TypeError:  # (a kind only PEFT's backend knows: its own quantizer decides)
                kind = None
            if kind is not None:
                kind.check_writable(merged)
    except ValueError as err:
        raise ValueError(
            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken ({err})"
        ) from None
    self.set_base_weight(merged)
