"""Quantized base layers for the bench (``--base``) and the demo (``--quantize``): float ``nn.Linear`` layers
replaced by bitsandbytes ones built from their weights, as QLoRA users get them.

- ``nf4`` / ``fp4``: ``bitsandbytes.nn.Linear4bit`` (that quant type, block size 64, nested absmax statistics:
  bitsandbytes' defaults, as ``BitsAndBytesConfig(load_in_4bit=True)`` builds them), compute dtype = the model's.
- ``int8``: ``bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False)`` (LLM.int8() row-wise int8 weights; outlier
  threshold 0.0, bitsandbytes' default for the module).

The bias stays in the float dtype, frozen. bitsandbytes quantizes a weight when its ``Params4bit`` / ``Int8Params``
is moved to a device (``.to(device)``, the CPU included), so a layer is built from a CPU copy of the float weight
and moved to ``device``. bitsandbytes is imported only here and only when a quantized base is asked for: the rest of
the CLI works without it (``bitsandbytes_problem`` says what to install).

On the CPU, bitsandbytes 0.50.2's ``Linear4bit`` repacks its weight in place, on its first eval-mode forward without
grad, into a layout that only its AVX512-BF16 inference kernel reads: after that a forward with grad raises (that
kernel has no backward), and the repack asserts ``out_features % 32 == 0``. The layers built here switch that repack
off (``support_avx512bf16_for_cpu = False``), so that one layer can be evaluated, trained and evaluated again (the
demo does, as does the bench's check that vera_ext and PEFT compute the same function before timing training): on
the CPU every call then takes bitsandbytes' dequantize-then-matmul path, training and inference alike. CUDA has no
such repack.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .. import quantized

BASES = ("none", "nf4", "fp4", "int8")
#: What each quantized base is, for headers and docs.
BASE_HELP = {
    "none": "the float nn.Linear (no quantization)",
    "nf4": "bitsandbytes Linear4bit, NF4 (QLoRA's 4-bit NormalFloat), block 64, nested absmax",
    "fp4": "bitsandbytes Linear4bit, FP4, block 64, nested absmax",
    "int8": "bitsandbytes Linear8bitLt, int8 row-wise weights (has_fp16_weights=False, threshold 0); its inference "
    "matmul casts the activations to fp16",
}


def bitsandbytes_problem(base: str, flag: str = "--base") -> Optional[str]:
    """None when ``base`` can be built here (``none`` always can), else the message naming ``flag`` and what to
    install."""
    if base not in BASES:
        return f"{flag}: unknown base {base!r}; choose from {', '.join(BASES)}"
    if base == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return f"{flag} {base} needs bitsandbytes (its CPU backend works too): pip install bitsandbytes ({err})"
    return None


def quantize_linear(linear: nn.Linear, base: str, device, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A bitsandbytes layer of kind ``base`` (nf4, fp4 or int8) holding ``linear``'s weight quantized on ``device``
    and its bias (in its dtype), frozen; ``linear`` is left as it was. ``compute_dtype``: a 4-bit layer's matmul
    dtype (default: the weight's). Built by ``vera_ext.quantized.quantize_linears`` (bitsandbytes' defaults: block
    64, nested absmax, int8 threshold 0) on a CPU copy, then moved."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"quantize_linear: expected an nn.Linear, got {type(linear).__name__}")
    if base not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quantize_linear: base must be one of nf4, fp4, int8, got {base!r}")
    holder = nn.Sequential(copy.deepcopy(linear).to("cpu"))
    quantized.quantize_linears(holder, base, compute_dtype=compute_dtype or linear.weight.dtype)
    layer = holder[0]
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    if base != "int8":
        layer.support_avx512bf16_for_cpu = False  # see the module docstring
    return layer.to(device)


def output_head_names(model: nn.Module) -> set[str]:
    """The module names of ``model``'s output layer (``get_output_embeddings()``, as PEFT's "all-linear" excludes
    it); empty when the model has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def quantize_linears(model: nn.Module, base: str, device, exclude: Iterable[str] = ()) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` (exactly that type) by its ``quantize_linear`` version,
    except the output head (``output_head_names``) and the modules named in ``exclude``: QLoRA's convention, every
    linear layer but the head. Compute dtype: each layer's weight dtype. Returns the replaced names, in order."""
    skip = output_head_names(model) | set(exclude)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), base, device))
    return names


def weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the tensors in the modules' state dicts, each storage counted once: the weight and bias of a float
    layer; of a bitsandbytes one, its packed weight, bias and quantization statistics (4-bit absmax, nested absmax
    and code tables; int8 row scales), which bitsandbytes writes into the state dict and which are no parameters."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in module.state_dict().values():
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def has_int8_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a bitsandbytes ``Linear8bitLt`` (False without bitsandbytes imported: none can)."""
    return any(type(m).__name__ == "Linear8bitLt" for m in model.modules())


def int8_dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``Linear8bitLt`` layers are ``nn.Linear`` layers holding their dequantized
    weights (int8 values x row scale / 127, what bitsandbytes' own dequantization computes) and their biases, in the
    bias's dtype (fp32 without one).

    LLM.int8()'s inference matmul also quantizes each activation row to int8, a step function of its input: two
    models whose activations differ by one rounding (vera_ext and PEFT add the adapter term in different orders)
    can then differ by a whole quantization step after a few layers. The same-function check compares such models
    through these copies: the same int8 weights, without the activation rounding."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]:
        weight = quantized.dequantize_weight(layer, torch.float32)
        dtype = layer.bias.dtype if layer.bias is not None else torch.float32
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model, child, plain.to(dtype).requires_grad_(False)
        )
    return model


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast from")


@contextlib.contextmanager
def quiet_int8_cast_notice() -> Iterator[None]:
    """Within the block, drop bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" log line, which
    it writes on every inference call of an int8 layer on fp32/bf16 inputs (one line per layer per forward); callers
    say it once instead. Other bitsandbytes messages pass."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    notice = _DropInt8CastNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
