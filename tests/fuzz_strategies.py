"""Hypothesis strategies and float64 references for the fuzz tests (tests/test_fuzz.py).

Operands are built from a seeded generator (hypothesis draws the seed, the shapes and the layouts), so every failing
example replays exactly. Layouts are real memory layouts, not just shapes: A and B are slices of a larger shared
projection (row stride > width), x may be stored transposed or be every other row of a bigger buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Bounded, reproducible runs for CI; the slow profile (pytest -m slow) searches longer.
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Ways a 2-D operand may sit in memory; every one is a legal strided tensor a caller can pass.
LAYOUTS = ["contiguous", "transposed", "row_padded", "every_other_row"]


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops keep lambdas in (docs/DESIGN.md §5): fp64 for fp64 data, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to the 2-D ``t`` (same values and dtype) stored in ``layout``."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major: stride (1, rows)
        return t.t().contiguous().t()
    if layout == "row_padded":  # rows of a wider buffer, like a slice of the shared projection
        buf = torch.full((rows, cols + 3), float("nan"), dtype=t.dtype)
        buf[:, :cols] = t
        return buf[:, :cols]
    if layout == "every_other_row":
        buf = torch.full((2 * rows, cols), float("nan"), dtype=t.dtype)
        buf[::2] = t
        return buf[::2]
    raise AssertionError(layout)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A copy of every byte of ``t``'s storage (padding and NaN payloads included)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


@dataclass
class OpCase:
    """Operands of one op call: x (N, I), base_out (N, O), weight (O, I), bias (O), A (r, I), B (O, r), lambdas
    (r)/(O) or stacked (K, r)/(K, O) with adapter_idx (N)."""

    x: torch.Tensor
    base_out: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    A: torch.Tensor
    B: torch.Tensor
    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    adapter_idx: Optional[torch.Tensor]
    fused: bool
    notes: dict = field(default_factory=dict)

    def tensors(self) -> dict:
        names = ("x", "base_out", "weight", "bias", "A", "B", "lambda_d", "lambda_b", "adapter_idx")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def call_forward(self, **overrides):
        """torch.ops.vera_ext.vera_forward or vera_linear_forward on these operands (with overrides)."""
        a = dict(self.tensors(), **overrides)
        ops = torch.ops.vera_ext
        if self.fused:
            return ops.vera_linear_forward(
                a["x"], a["weight"], a.get("bias"), a["A"], a["B"], a["lambda_d"], a["lambda_b"], a.get("adapter_idx")
            )
        return ops.vera_forward(
            a["x"], a["base_out"], a["A"], a["B"], a["lambda_d"], a["lambda_b"], a.get("adapter_idx")
        )


@st.composite
def op_cases(draw, dtypes=X_DTYPES, max_rows=40, allow_nan=True, stacked=True):
    """Valid operands for the forward ops. N covers 0, 1, the fused decode path (N <= 16) and the GEMM paths
    (N below and above r; with adapter_idx the per-row path); dims include 1 and odd sizes."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.one_of(st.sampled_from([0, 1, 2, 16, 17]), st.integers(0, max_rows)))
    i, o = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    r = draw(st.one_of(st.sampled_from([1, 2, 17, 33]), st.integers(1, 24)))
    # number of stacked adapters; None: no adapter_idx
    k = draw(st.sampled_from([None, 1, 2, 3])) if stacked else None
    fused = draw(st.booleans())
    has_bias = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    # A and B are the layer's views into a bigger shared projection (vera_A[:r, :I], vera_B[:O, :r]).
    pad_r, pad_i, pad_o = (draw(st.integers(0, 3)) for _ in range(3))
    full_A, full_B = rand(r + pad_r, i + pad_i), rand(o + pad_o, r + pad_r)
    A, B = full_A[:r, :i], full_B[:o, :r]
    if draw(st.booleans()):  # or a column-major projection (inner stride != 1)
        A, B = with_layout(A, "transposed"), with_layout(B, "transposed")
    x = with_layout(rand(n, i), draw(st.sampled_from(LAYOUTS)))
    base_out = with_layout(rand(n, o), draw(st.sampled_from(LAYOUTS)))
    weight = with_layout(rand(o, i), draw(st.sampled_from(LAYOUTS)))
    bias = rand(o) if has_bias else None
    lam = opmath(dtype)
    if k is None:
        ld, lb, idx = rand(r, dt=lam), rand(o, dt=lam), None
    else:
        ld, lb = rand(k, r, dt=lam), rand(k, o, dt=lam)
        idx = torch.randint(-1, k, (n,), generator=g)
    notes = {}
    if allow_nan and n > 0 and draw(st.integers(0, 9)) == 0:  # now and then a NaN/Inf in the input
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        where = draw(st.sampled_from(["x", "lambda_d", "lambda_b"]))
        target = {"x": x, "lambda_d": ld, "lambda_b": lb}[where]
        flat = draw(st.integers(0, target.numel() - 1))
        target[torch.unravel_index(torch.tensor(flat), target.shape)] = value  # (x may be a strided view)
        notes["non_finite"] = where
    return OpCase(x, base_out, weight, bias, A, B, ld, lb, idx, fused, notes)


def vera_formula(x, base, A, B, lambda_d, lambda_b, adapter_idx=None):
    """base + lambda_b[a(n)] * ((x A^T * lambda_d[a(n)]) B^T) per row n (rows with a(n) = -1: base alone),
    in the tensors' own dtype. Returns (y, u)."""
    u = x @ A.T
    if adapter_idx is None:
        return base + lambda_b * ((u * lambda_d) @ B.T), u
    safe = adapter_idx.clamp(min=0)
    term = lambda_b[safe] * ((u * lambda_d[safe]) @ B.T)
    # rows without an adapter take the base output alone (no NaN from the adapter term leaks in)
    return torch.where((adapter_idx >= 0).unsqueeze(1), base + term, base), u


def float64_operands(case: OpCase, absolute: bool = False) -> dict:
    """The case's tensors in float64 (detached leaves); with ``absolute``, their absolute values: the
    magnitudes rounding errors scale with."""
    out = {}
    for name, t in case.tensors().items():
        if name == "adapter_idx":
            out[name] = t
            continue
        t = t.detach().clone().double()
        out[name] = (t.abs() if absolute else t).requires_grad_(True)
    return out


def forward_reference(case: OpCase, absolute: bool = False, operands: Optional[dict] = None):
    """(y, u) in float64 for the case (see :func:`vera_formula`); ``operands`` from :func:`float64_operands`."""
    a = operands if operands is not None else float64_operands(case, absolute)
    if case.fused:
        base = a["x"] @ a["weight"].T + (a["bias"] if "bias" in a else 0.0)
    else:
        base = a["base_out"]
    return vera_formula(a["x"], base, a["A"], a["B"], a["lambda_d"], a["lambda_b"], a.get("adapter_idx"))


def same_dtype_forward(case: OpCase):
    """(y, u) from the formula run in x's dtype with plain PyTorch: the error budget for low precision."""
    dt = case.x.dtype
    base = torch.nn.functional.linear(case.x, case.weight, case.bias) if case.fused else case.base_out
    return vera_formula(
        case.x, base, case.A.to(dt), case.B.to(dt), case.lambda_d.to(dt), case.lambda_b.to(dt), case.adapter_idx
    )
