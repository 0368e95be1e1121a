"""Shared references and helpers for the vera_ext tests.

References are ones we did not write: PEFT 0.21.2's VeRA layer, and the VeRA formula evaluated in float64.
CUDA cases are decided at test time (never at import), so the suite collects and skips cleanly without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def vera_reference(x, base_out, A, B, lambda_d, lambda_b):
    """The VeRA term in float64: base_out + lambda_b * ((x A^T) * lambda_d) B^T."""
    d = torch.float64
    return base_out.to(d) + lambda_b.to(d) * (((x.to(d) @ A.to(d).T) * lambda_d.to(d)) @ B.to(d).T)


def peft_formula(x, base_out, A, B, lambda_d, lambda_b, dtype):
    """PEFT's forward formula run entirely in `dtype`: the error budget for low-precision results."""
    return base_out.to(dtype) + lambda_b.to(dtype) * F.linear(
        lambda_d.to(dtype) * F.linear(x.to(dtype), A.to(dtype)), B.to(dtype)
    )


def assert_low_precision_close(ours, same_dtype, ref64, factor=2.0, what="result"):
    """ours must be within `factor` x the error the same-dtype PyTorch computation makes against float64
    (plus a floor of one ulp of the output scale for results that are exact in that dtype)."""
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (same_dtype.double() - ref64).abs().max().item()
    floor = torch.finfo(ours.dtype).eps * max(1.0, ref64.abs().max().item())
    assert ours_err <= factor * torch_err + floor, (
        f"{what}: error {ours_err:.3g} exceeds {factor} x the same-dtype PyTorch error {torch_err:.3g}"
    )


def make_peft_vera_linear(base: nn.Module, vera_A, vera_B, r, adapter="default", **config_kwargs):
    """PEFT 0.21.2's VeRA Linear layer around a copy of `base`, sharing the given projection."""
    from peft import VeraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.vera.layer import Linear

    config = VeraConfig(r=r, target_modules=["base"], **config_kwargs)
    va = BufferDict({adapter: vera_A}, persistent=True)
    vb = BufferDict({adapter: vera_B}, persistent=True)
    return Linear(
        copy.deepcopy(base),
        va,
        vb,
        adapter_name=adapter,
        config=config,
        r=r,
        is_target_conv_1d_layer=config_kwargs.get("fan_in_fan_out", False),
    )
