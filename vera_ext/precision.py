"""The precision rule shared by the layer and the PEFT patch: the op-math dtype (csrc/common/checks.h has its C++
twin, opmath_dtype, which the ops check the lambdas against)."""

import torch

__all__ = ["opmath_dtype"]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in and keep lambdas in for data of ``dtype``: fp32, or fp64 for fp64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32
