"""Property-based fuzzing (hypothesis) of the raw ops and of VeraLinear.

Valid inputs must equal the float64 formula (docs/DESIGN.md §2) within what their dtype allows and hold no NaN the
inputs did not bring; invalid inputs must raise a clear error naming the argument and leave every tensor byte for
byte as it was. Layer-level: random sequences of adapter management, merges and forwards against a float64 model
of what the layer should hold. Runs are bounded and derandomized (FAST); ``pytest -m slow`` searches longer.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from vera_ext import ops

from fuzz_strategies import (
    FAST,
    LOW_PRECISION,
    SLOW,
    X_DTYPES,
    OpCase,
    float64_operands,
    forward_reference,
    op_cases,
    same_dtype_forward,
    storage_bytes,
    with_layout,
)
from vera_testing import assert_low_precision_close

OPS = torch.ops.vera_ext
ERRORS = (ValueError, RuntimeError, TypeError, IndexError)


def fuzz(body, strategy):
    """(fast test, slow-marked test) running ``body`` on examples of ``strategy``. The long search runs only when
    asked for (``pytest -m slow``: pyproject's addopts deselect slow tests otherwise)."""
    fast = FAST(given(strategy)(body))
    long_search = SLOW(given(strategy)(body))

    @pytest.mark.slow
    def slow():
        long_search()

    slow.__doc__ = f"{body.__name__} over {SLOW.max_examples} examples."
    return fast, slow


def assert_matches_reference(ours, ref, mag, dtype, same=None, what="result"):
    """Non-finite exactly where the float64 reference is; elsewhere within the dtype's rounding of the magnitudes
    ``mag`` (fp32/fp64), or within 2x the same-dtype PyTorch error ``same`` (fp16/bf16)."""
    ours64 = ours.detach().double()
    bad_ours, bad_ref = ~torch.isfinite(ours64), ~torch.isfinite(ref)
    assert torch.equal(bad_ours, bad_ref), (
        f"{what}: non-finite at {bad_ours.nonzero().tolist()[:5]}, reference at {bad_ref.nonzero().tolist()[:5]}"
    )
    ok = ~bad_ref
    if dtype in LOW_PRECISION:
        if ok.any():
            assert_low_precision_close(ours[ok], same[ok], ref[ok], what=what)
        return
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    err = (ours64 - ref).abs()[ok]
    bound = rel * mag.detach()[ok] + 1e-300
    assert (err <= bound).all(), f"{what}: error {(err / bound).max().item():.3g} x the {dtype} bound"


# -------------------------------------------------------------------------------------------- op level: values


def _forward_matches_float64(case: OpCase):
    before = {n: storage_bytes(t) for n, t in case.tensors().items()}
    y, u = case.call_forward()
    n, o = case.x.shape[0], case.B.shape[0]
    assert y.shape == (n, o) and u.shape == (n, case.A.shape[0]) and y.dtype == u.dtype == case.x.dtype
    ref, ref_u = forward_reference(case)
    mag, mag_u = forward_reference(case, absolute=True)
    same, same_u = same_dtype_forward(case) if case.x.dtype in LOW_PRECISION else (None, None)
    assert_matches_reference(y, ref.detach(), mag, case.x.dtype, same, "y")
    assert_matches_reference(u, ref_u.detach(), mag_u, case.x.dtype, same_u, "u")
    for name, t in case.tensors().items():  # the ops read their inputs, never write them
        assert torch.equal(storage_bytes(t), before[name]), f"{name} was modified"


test_forward_ops_match_float64, test_forward_ops_match_float64_long = fuzz(_forward_matches_float64, op_cases())


def _gradients_match_float64(args):
    case, needs = args
    leaves = {"x": case.x, "lambda_d": case.lambda_d, "lambda_b": case.lambda_b}
    if case.fused:
        leaves.update(weight=case.weight, **({"bias": case.bias} if case.bias is not None else {}))
    else:
        leaves["base_out"] = case.base_out
    chosen = [n for n, need in zip(sorted(leaves), needs) if need] or ["lambda_b"]
    for n in chosen:
        leaves[n].requires_grad_(True)
    if case.fused:
        y = ops.vera_linear_forward(
            case.x, case.weight, case.bias, case.A, case.B, case.lambda_d, case.lambda_b, case.adapter_idx
        )
    else:
        y = ops.vera_forward(case.x, case.base_out, case.A, case.B, case.lambda_d, case.lambda_b, case.adapter_idx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    ours = torch.autograd.grad(y, [leaves[n] for n in chosen], g)

    ref64, mag64 = float64_operands(case), float64_operands(case, absolute=True)
    expected = torch.autograd.grad(forward_reference(case, operands=ref64)[0], [ref64[n] for n in chosen], g.double())
    # gradients of the formula on absolute values, with |g|: the sum of |terms| each gradient entry adds up
    mags = torch.autograd.grad(forward_reference(case, operands=mag64)[0], [mag64[n] for n in chosen], g.double().abs())
    for name, a, b, m in zip(chosen, ours, expected, mags):
        assert a.shape == leaves[name].shape, name
        assert_matches_reference(a, b, m, case.x.dtype, what=f"grad {name}")


grad_cases = st.tuples(
    op_cases(dtypes=[torch.float32, torch.float64], allow_nan=False), st.lists(st.booleans(), min_size=6, max_size=6)
)
test_gradients_match_float64, test_gradients_match_float64_long = fuzz(_gradients_match_float64, grad_cases)


@st.composite
def merge_cases(draw):
    """(A, B, lambda_d, lambda_b, weight, alpha, fan_in_fan_out): a weight of any float dtype and layout."""
    case = draw(op_cases(dtypes=[torch.float32, torch.float64], max_rows=0, allow_nan=False, stacked=False))
    wdtype = draw(st.sampled_from(X_DTYPES))
    fan_in_fan_out = draw(st.booleans())
    o, i = case.B.shape[0], case.A.shape[1]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn((i, o) if fan_in_fan_out else (o, i), generator=g).to(wdtype)
    weight = with_layout(w, draw(st.sampled_from(["contiguous", "transposed", "row_padded"])))
    alpha = draw(st.sampled_from([1.0, -1.0, 0.5, 0.0]))
    return case.A, case.B, case.lambda_d, case.lambda_b, weight, alpha, fan_in_fan_out


def _delta_and_merge_match_float64(args):
    A, B, ld, lb, weight, alpha, fan_in_fan_out = args
    delta64 = (lb.double()[:, None] * B.double()) @ (ld.double()[:, None] * A.double())
    mag = (lb.double().abs()[:, None] * B.double().abs()) @ (ld.double().abs()[:, None] * A.double().abs())
    if fan_in_fan_out:
        delta64, mag = delta64.T, mag.T
    # fp32 math, one rounding to the requested dtype (docs/DESIGN.md §5)
    for dtype in (torch.float32, weight.dtype):
        delta = ops.vera_delta_weight(A, B, ld, lb, fan_in_fan_out, dtype)
        assert delta.shape == delta64.shape and delta.dtype == dtype
        rounding = torch.finfo(dtype).eps * delta64.abs()
        assert ((delta.double() - delta64).abs() <= 2e-5 * mag + rounding + 1e-300).all(), dtype

    w0 = weight.detach().clone().double()  # (.double() of an fp64 weight would alias it)
    ops.vera_merge_(weight, A, B, ld, lb, alpha, fan_in_fan_out, safe=True)
    expected = w0 + alpha * delta64
    one_rounding = torch.finfo(weight.dtype).eps * expected.abs()
    err = (weight.double() - expected).abs()
    assert (err <= 2e-5 * abs(alpha) * mag + one_rounding + 1e-300).all(), f"merge into {weight.dtype}"


test_delta_and_merge_match_float64, test_delta_and_merge_match_float64_long = fuzz(
    _delta_and_merge_match_float64, merge_cases()
)


# --------------------------------------------------------------------------------------- op level: refusals


def _other_float(dtype):
    return torch.float16 if dtype != torch.float16 else torch.bfloat16


def _bad_arguments(case: OpCase):
    """(argument, bad value, names the error may give) for every wrong input that applies to ``case``."""
    n, i = case.x.shape
    o, r = case.B.shape
    dt, lam = case.x.dtype, case.lambda_d.dtype
    stacked = case.adapter_idx is not None
    k = case.lambda_d.shape[0] if stacked else 1
    lead = (k,) if stacked else ()
    bad = [
        ("x", case.x.unsqueeze(-1), {"x"}),
        ("x", case.x.to(torch.int32), {"x"}),
        ("x", torch.randn(n, i + 1).to(dt), {"A", "weight"}),
        ("A", torch.randn(r + 1, i).to(dt), {"A"}),
        ("A", torch.randn(r, i + 2).to(dt), {"A", "weight"}),
        ("A", case.A.to(_other_float(dt)), {"A"}),
        ("A", case.A[0], {"A"}),
        ("B", torch.randn(o, r + 1).to(dt), {"B"}),
        ("B", torch.randn(o + 1, r).to(dt), {"B"}),
        ("B", case.B.to(_other_float(dt)), {"B"}),
        ("lambda_d", case.lambda_d.to(torch.float16), {"lambda_d"}),
        ("lambda_d", case.lambda_d.to(torch.int64), {"lambda_d"}),
        ("lambda_d", case.lambda_d.to(torch.float64 if lam == torch.float32 else torch.float32), {"lambda_d"}),
        ("lambda_d", torch.randn(*lead, r + 1, dtype=lam), {"lambda_d", "A"}),
        ("lambda_d", torch.tensor(1.0, dtype=lam), {"lambda_d"}),
        ("lambda_d", torch.randn(*lead, 0, dtype=lam), {"lambda_d"}),
        ("lambda_b", torch.randn(*lead, o + 1, dtype=lam), {"lambda_b"}),
        ("lambda_b", case.lambda_b.to(torch.bfloat16), {"lambda_b"}),
        ("lambda_b", case.lambda_b.unsqueeze(0).expand(2, *case.lambda_b.shape), {"lambda_b", "lambda_d"}),
    ]
    if case.fused:
        bad += [
            ("weight", torch.randn(o, i + 1).to(dt), {"weight"}),
            ("weight", case.weight.to(_other_float(dt)), {"weight"}),
            ("weight", case.weight[0], {"weight"}),
            ("bias", torch.randn(o + 1).to(dt), {"bias", "B"}),
            ("bias", torch.randn(1, o).to(dt), {"bias"}),
            ("bias", torch.randn(o).to(_other_float(dt)), {"bias"}),
        ]
    else:
        bad += [
            ("base_out", torch.randn(n + 1, o).to(dt), {"base_out"}),
            ("base_out", case.base_out.to(_other_float(dt)), {"base_out"}),
            ("base_out", torch.randn(o).to(dt), {"base_out"}),
        ]
    if stacked:
        idx = case.adapter_idx
        bad += [
            ("adapter_idx", idx.to(torch.int32), {"adapter_idx"}),
            ("adapter_idx", idx.to(torch.float32), {"adapter_idx"}),
            ("adapter_idx", torch.zeros(n + 1, dtype=torch.int64), {"adapter_idx"}),
            ("adapter_idx", idx.unsqueeze(0), {"adapter_idx"}),
            ("lambda_b", torch.randn(k + 1, o, dtype=lam), {"lambda_b", "lambda_d"}),
        ]
        if n > 0:
            for value in (k, -2, 2**40, -(2**62)):
                wrong = idx.clone()
                wrong[n // 2] = value
                bad.append(("adapter_idx", wrong, {"adapter_idx"}))
    else:
        bad.append(("adapter_idx", torch.zeros(n, dtype=torch.int64), {"lambda_d", "lambda_b", "adapter_idx"}))
    return bad


@st.composite
def refused_calls(draw):
    case = draw(op_cases(allow_nan=False))
    return case, draw(st.sampled_from(_bad_arguments(case)))


def _refused_call_changes_nothing(args):
    case, (name, value, named) = args
    before = {n: storage_bytes(t) for n, t in case.tensors().items()}
    with pytest.raises(ERRORS) as info:
        case.call_forward(**{name: value})
    message = str(info.value)
    assert any(f"{n} " in message or f"{n}[" in message for n in named), (name, message)
    for n, t in case.tensors().items():
        assert torch.equal(storage_bytes(t), before[n]), f"{n} changed by a refused call"


test_bad_op_arguments_are_refused, test_bad_op_arguments_are_refused_long = fuzz(
    _refused_call_changes_nothing, refused_calls()
)


@st.composite
def broken_merges(draw):
    """A merge whose result would not be finite: NaN/Inf in a lambda or the projection, or an fp16/bf16 weight
    that overflows once the delta is added."""
    A, B, ld, lb, weight, alpha, fan_in_fan_out = draw(merge_cases())
    alpha = draw(st.sampled_from([1.0, -1.0]))
    how = draw(st.sampled_from(["lambda_d", "lambda_b", "A", "B", "weight", "overflow"]))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if how == "overflow":  # every weight at the top of its range, pushed over it by a delta of the same sign
        ld, lb = torch.ones_like(ld), torch.full_like(lb, 1e4)
        A, B = torch.ones_like(A), torch.ones_like(B)
        weight.fill_(torch.finfo(weight.dtype).max * alpha)
    else:
        target = {"lambda_d": ld, "lambda_b": lb, "A": A, "B": B, "weight": weight}[how]
        target[tuple(draw(st.integers(0, s - 1)) for s in target.shape)] = value
    return A, B, ld, lb, weight, alpha, fan_in_fan_out, how


def _safe_merge_refuses_non_finite(args):
    A, B, ld, lb, weight, alpha, fan_in_fan_out, how = args
    delta = ops.vera_delta_weight(A, B, ld, lb, fan_in_fan_out, torch.float32).double()
    merged = weight.double() + alpha * delta
    assume(not merged.to(weight.dtype).isfinite().all())  # (an fp32/bf16 weight absorbs the "overflow" delta)
    before = [storage_bytes(t) for t in (A, B, ld, lb, weight)]
    with pytest.raises(ValueError, match="non-finite"):
        ops.vera_merge_(weight, A, B, ld, lb, alpha, fan_in_fan_out, safe=True)
    for t, b in zip((A, B, ld, lb, weight), before):
        assert torch.equal(storage_bytes(t), b), f"a refused safe merge changed its inputs ({how})"


test_safe_merge_refuses_and_keeps_weight, test_safe_merge_refuses_and_keeps_weight_long = fuzz(
    _safe_merge_refuses_non_finite, broken_merges()
)


# ------------------------------------------------------------------------------------------------ layer level

POOL = ["default", "a", "b"]  # adapter names the sequences use; "ghost" is never added


class ShadowLayer:
    """What a VeraLinear should hold and compute, in float64: the original base weight, which adapters exist
    (their lambdas are read from the layer, and checked unchanged by refused calls), which are active and merged."""

    def __init__(self, layer, conv1d: bool):
        w = layer.base_layer.weight.detach().double().clone()
        self.weight = w.T if conv1d else w  # (out, in)
        bias = layer.base_layer.bias
        self.bias = (
            bias.detach().double().clone()
            if bias is not None
            else torch.zeros(self.weight.shape[0], dtype=torch.float64)
        )
        self.layer, self.conv1d = layer, conv1d
        self.ranks = {"default": layer.r["default"]}
        drop = layer.vera_dropout["default"]
        self.dropout = {"default": drop.p if isinstance(drop, torch.nn.Dropout) else 0.0}
        self.active, self.merged, self.disabled = ["default"], [], False

    def term(self, name, x, absolute=False):
        """The adapter term of ``name`` for rows x (M, I) in float64 (or its magnitude)."""
        f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        r = self.ranks[name]
        proj = self.layer.vera_projection
        A = f(proj.vera_A[:r, : self.weight.shape[1]])
        B = f(proj.vera_B[: self.weight.shape[0], :r])
        ld, lb = f(self.layer.vera_lambda_d[name]), f(self.layer.vera_lambda_b[name])
        return lb * (((x @ A.T) * ld) @ B.T)

    def base(self, x, absolute=False):
        w = self.weight.abs() if absolute else self.weight
        for name in self.merged if not absolute else []:
            w = w + self.term(name, torch.eye(w.shape[1], dtype=torch.float64)).T
        return x @ w.T + (self.bias.abs() if absolute else self.bias)

    def magnitude(self, x, names):
        """Sum of |terms| of the result: what its rounding error scales with (merged deltas included)."""
        xa = x.abs()
        mag = self.base(xa, absolute=True)
        for name in set(names) | set(self.merged):
            mag = mag + self.term(name, xa, absolute=True)
        return mag


def _layer_snapshot(layer):
    return (
        {k: storage_bytes(v) for k, v in layer.state_dict().items()},
        dict(layer.r),
        list(layer.merged_adapters),
        list(layer.active_adapters),
        layer.disable_adapters,
        layer.training,
    )


@st.composite
def layer_setups(draw):
    from transformers.pytorch_utils import Conv1D

    from vera_ext import VeraLinear, VeraProjection

    class LinearSubclass(torch.nn.Linear):
        """An nn.Linear subclass: mergeable, but the layer must not take the fused path for it."""

    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["linear", "linear_nobias", "subclass", "conv1d"]))
    # small in_features often, so dropout masks can be solved for (out >= r >= in)
    in_f, out_f, rank = draw(st.sampled_from([1, 2, 2, 3, 4, 6])), draw(st.integers(1, 9)), draw(st.integers(1, 8))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = {
        "linear": lambda: torch.nn.Linear(in_f, out_f),
        "linear_nobias": lambda: torch.nn.Linear(in_f, out_f, False),
        "subclass": lambda: LinearSubclass(in_f, out_f),
        "conv1d": lambda: Conv1D(out_f, in_f),
    }[kind]()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    base = base.to(dtype)
    proj = VeraProjection.from_key(
        rank, in_f + draw(st.integers(0, 2)), out_f + draw(st.integers(0, 2)), prng_key=draw(st.integers(0, 100))
    )
    dropout = draw(st.sampled_from([0.0, 0.5]))
    layer = VeraLinear(
        base,
        draw(st.integers(1, rank)),
        projection=proj,
        init_weights=False,
        fan_in_fan_out=kind == "conv1d",
        vera_dropout=dropout,
    )
    layer.train(draw(st.booleans()))
    return layer, kind == "conv1d", dtype


def _randomize(layer, name, g):
    with torch.no_grad():
        layer.vera_lambda_d[name].copy_(torch.randn(layer.vera_lambda_d[name].shape, generator=g))
        layer.vera_lambda_b[name].copy_(torch.randn(layer.vera_lambda_b[name].shape, generator=g))


def _expect_refusal(layer, call, errors=ERRORS, match=None):
    snap = _layer_snapshot(layer)
    with pytest.raises(errors, match=match):
        call()
    after = _layer_snapshot(layer)
    assert after[0].keys() == snap[0].keys()
    for k in snap[0]:
        assert torch.equal(after[0][k], snap[0][k]), f"{k} changed by a refused call"
    assert after[1:] == snap[1:], "adapter bookkeeping changed by a refused call"


def _recovered_input(shadow, name, delta, x):
    """x_d with delta = term(name, x_d), solved by least squares (needs out >= r >= in: A_l, B_l full rank)."""
    r = shadow.ranks[name]
    proj = shadow.layer.vera_projection
    A = proj.vera_A[:r, : shadow.weight.shape[1]].double()
    B = proj.vera_B[: shadow.weight.shape[0], :r].double()
    ld, lb = shadow.layer.vera_lambda_d[name].detach().double(), shadow.layer.vera_lambda_b[name].detach().double()
    w = torch.linalg.lstsq(B, (delta / lb).T).solution.T / ld
    return torch.linalg.lstsq(A, w.T).solution.T


def _check_rows(shadow, y, x, row_names, dtype, training):
    """Each row of y against base(x) + its adapter terms. Rows whose adapter drops out (training, p > 0) hold
    base + term(x_d) for some x_d with every entry 0 or x / (1 - p): checked by solving for x_d where the
    shapes make it unique (fp64 layers), else only for finiteness."""
    x64 = x.detach().double()
    rel = 1e-12 if dtype == torch.float64 and not shadow.merged else 2e-5
    base = shadow.base(x64)
    for row, names in enumerate(row_names):
        xr, yr = x64[row : row + 1], y[row : row + 1].double()
        dropping = [n for n in names if training and shadow.dropout[n] > 0]
        if not dropping:
            ref = base[row : row + 1] + sum((shadow.term(n, xr) for n in names), torch.zeros_like(yr))
            bound = rel * shadow.magnitude(xr, names) + 1e-300
            assert ((yr - ref).abs() <= bound).all(), f"row {row} ({names}): error {(yr - ref).abs().max():.3g}"
            continue
        assert torch.isfinite(yr).all(), f"row {row}: NaN/Inf from dropout"
        name = names[0]
        r, (out_f, in_f) = shadow.ranks[name], shadow.weight.shape
        if len(names) == 1 and dtype == torch.float64 and out_f >= r >= in_f:
            xd = _recovered_input(shadow, name, yr - base[row : row + 1], xr)
            scaled = xr / (1 - shadow.dropout[name])
            tol = 1e-6 * (1 + scaled.abs())
            assert ((xd.abs() <= tol) | ((xd - scaled).abs() <= tol)).all(), f"row {row}: not a dropout of x"


def _forward_step(data, layer, shadow, dtype):
    in_f = shadow.weight.shape[1]
    shape = data.draw(st.sampled_from(["2d", "3d", "1d"]))
    n = data.draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn({"2d": (n, in_f), "3d": (n, 2, in_f), "1d": (in_f,)}[shape], generator=g).to(dtype)
    samples = 1 if shape == "1d" else n
    known = list(shadow.ranks) + ["__base__"]
    mixed = data.draw(st.sampled_from([None, "valid", "valid", "unknown", "wrong_length"]))
    names = None
    if mixed == "valid":
        names = [data.draw(st.sampled_from(known)) for _ in range(samples)]
    elif mixed == "unknown" and samples > 0:
        names = [data.draw(st.sampled_from(known)) for _ in range(samples)]
        names[data.draw(st.integers(0, samples - 1))] = "ghost"
    elif mixed == "wrong_length":
        length = samples + (1 if samples == 0 else data.draw(st.sampled_from([-1, 1])))
        names = [data.draw(st.sampled_from(known)) for _ in range(length)]
    torch.manual_seed(data.draw(st.integers(0, 2**16)))  # the dropout masks

    if shadow.disabled:
        if shadow.merged:  # a disabled layer unmerges before running the base layer (as PEFT does)
            shadow.merged = []
        row_names = [[]] * samples
    elif names is not None:
        if shadow.merged or len(names) != samples or "ghost" in names:
            _expect_refusal(
                layer,
                lambda: layer(x, adapter_names=names),
                ValueError,
                "merged adapters|Length of `adapter_names`|non-existing adapter",
            )
            return
        row_names = [[] if nm == "__base__" else [nm] for nm in names]
    elif shadow.merged:
        row_names = [[]] * samples
    else:
        row_names = [[n for n in shadow.active if n in shadow.ranks]] * samples

    with torch.no_grad():
        before = {k: storage_bytes(v) for k, v in layer.state_dict().items() if "vera_lambda" in k}
        y = layer(x, adapter_names=names)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], shadow.weight.shape[0])
    assert layer.merged_adapters == shadow.merged
    for k, v in layer.state_dict().items():  # a forward never writes the adapter
        if k in before:
            assert torch.equal(storage_bytes(v), before[k]), k
    x2, y2 = x.reshape(-1, in_f), y.reshape(-1, y.shape[-1])
    per_row = [nm for nm in row_names for _ in range(x2.shape[0] // max(1, samples))]
    _check_rows(shadow, y2, x2, per_row, dtype, layer.training)


def _layer_sequence(data):
    import warnings

    layer, conv1d, dtype = data.draw(layer_setups())
    shadow = ShadowLayer(layer, conv1d)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    _randomize(layer, "default", g)
    max_r = layer.vera_projection.r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(data.draw(st.integers(3, 14))):
            action = data.draw(
                st.sampled_from(
                    ["forward"] * 5
                    + ["add", "add", "set", "merge", "merge", "unmerge", "delete", "disable", "train", "poison"]
                )
            )
            if action == "forward":
                _forward_step(data, layer, shadow, dtype)
            elif action == "add":
                name = data.draw(st.sampled_from(POOL + ["__base__"]))
                r = data.draw(st.sampled_from([0, 2.0, max_r + 1] + list(range(1, max_r + 1)) * 3))
                p = data.draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, -0.1]))
                call = lambda: layer.update_layer(name, r, vera_dropout=p, init_weights=False)  # noqa: E731
                if (
                    name == "__base__"
                    or not isinstance(r, int)
                    or not 1 <= r <= max_r
                    or not 0 <= p < 1
                    or name in shadow.merged
                ):
                    _expect_refusal(layer, call, ValueError)
                    continue
                call()
                _randomize(layer, name, g)
                shadow.ranks[name], shadow.dropout[name] = r, p
            elif action == "set":
                names = data.draw(st.lists(st.sampled_from(POOL + ["ghost"]), max_size=3, unique=True))
                if any(n not in shadow.ranks for n in names):
                    _expect_refusal(layer, lambda: layer.set_adapter(names), ValueError, "unknown adapter")
                    continue
                layer.set_adapter(names)
                shadow.active = names
            elif action == "merge":
                safe = data.draw(st.booleans())
                names = data.draw(
                    st.one_of(
                        st.none(),
                        st.just("default"),
                        st.lists(st.sampled_from(POOL + ["ghost"]), max_size=3, unique=True),
                    )
                )
                if isinstance(names, str):
                    _expect_refusal(layer, lambda: layer.merge(safe, names), TypeError, "list of strings")
                    continue
                todo = shadow.active if names is None else names
                if any(n not in shadow.ranks for n in todo):
                    _expect_refusal(layer, lambda: layer.merge(safe, names), ValueError, "unknown adapter")
                    continue
                layer.merge(safe, names)
                shadow.merged += [n for n in todo if n not in shadow.merged]
                assert layer.merged_adapters == shadow.merged
            elif action == "unmerge":
                layer.unmerge()
                shadow.merged = []
            elif action == "delete":
                name = data.draw(st.sampled_from(POOL + ["ghost"]))
                if name not in shadow.ranks or name in shadow.merged:
                    _expect_refusal(layer, lambda: layer.delete_adapter(name), ValueError, "unknown|unmerge")
                    continue
                layer.delete_adapter(name)
                del shadow.ranks[name], shadow.dropout[name]
                if name in shadow.active:
                    shadow.active = list(shadow.ranks)[:1]
            elif action == "disable":
                shadow.disabled = data.draw(st.booleans())
                layer.enable_adapters(not shadow.disabled)
            elif action == "train":
                layer.train(data.draw(st.booleans()))
            elif action == "poison" and shadow.ranks:
                # a broken adapter: safe merge must refuse it and change nothing; unmerged, its NaN must stay in
                # the rows that use it
                name = data.draw(st.sampled_from(sorted(shadow.ranks)))
                which = data.draw(st.sampled_from(["vera_lambda_d", "vera_lambda_b"]))
                param = getattr(layer, which)[name]
                spot = data.draw(st.integers(0, param.numel() - 1))
                keep = param.detach().clone()
                with torch.no_grad():
                    param[spot] = data.draw(st.sampled_from([float("nan"), float("inf")]))
                if name not in shadow.merged:
                    _expect_refusal(layer, lambda: layer.merge(True, [name]), ValueError, "NaNs detected")
                others = [n for n in shadow.ranks if n != name]
                if not shadow.merged and others and not shadow.disabled:
                    x = torch.randn(3, shadow.weight.shape[1], generator=g).to(dtype)
                    with torch.no_grad():
                        y = layer(x, adapter_names=[others[0], name, "__base__"])
                    assert torch.isfinite(y[[0, 2]]).all(), "a broken adapter's NaN leaked into other rows"
                with torch.no_grad():
                    param.copy_(keep)
            assert layer.merged_adapters == shadow.merged and layer.disable_adapters == shadow.disabled


test_layer_action_sequences, test_layer_action_sequences_long = fuzz(_layer_sequence, st.data())


@st.composite
def dropout_setups(draw):
    """fp64 layers shaped so a dropped-out input can be solved for (out >= r >= in), two adapters with their own
    dropout, in train or eval mode, run on one adapter or on a mixed batch."""
    from vera_ext import VeraLinear, VeraProjection

    in_f = draw(st.integers(1, 4))
    r = draw(st.integers(in_f, 6))
    out_f = draw(st.integers(r, 8))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = torch.nn.Linear(in_f, out_f, bias=draw(st.booleans())).double()
    proj = VeraProjection.from_key(r, in_f, out_f, prng_key=draw(st.integers(0, 100)))
    probs = [draw(st.sampled_from([0.0, 0.3, 0.9])) for _ in range(2)]
    layer = VeraLinear(base, r, projection=proj, init_weights=False, vera_dropout=probs[0])
    layer.update_layer("b", r, vera_dropout=probs[1], init_weights=False)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for name in ("default", "b"):
        _randomize(layer, name, g)
    layer.train(draw(st.booleans()))
    n = draw(st.integers(1, 6))
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    names = draw(
        st.one_of(
            st.sampled_from([["default"], ["b"]]),
            st.lists(st.sampled_from(["default", "b", "__base__"]), min_size=n, max_size=n),
        )
    )
    return layer, x, names, draw(st.integers(0, 2**16))


def _dropout_train_eval(args):
    layer, x, names, seed = args
    shadow = ShadowLayer(layer, conv1d=False)
    shadow.ranks["b"] = layer.r["b"]
    shadow.dropout = {n: (d.p if isinstance(d, torch.nn.Dropout) else 0.0) for n, d in layer.vera_dropout.items()}
    torch.manual_seed(seed)
    with torch.no_grad():
        if len(names) == 1 and x.shape[0] != 1:  # one active adapter for the whole batch
            layer.set_adapter(names)
            y, row_names = layer(x), [names] * x.shape[0]
        else:
            y = layer(x, adapter_names=names)
            row_names = [[] if n == "__base__" else [n] for n in names]
    _check_rows(shadow, y, x, row_names, torch.float64, layer.training)


test_dropout_train_and_eval, test_dropout_train_and_eval_long = fuzz(_dropout_train_eval, dropout_setups())


# ------------------------------------------------------------------------------------- bugs the fuzzing found

_STRIDED_IDX_SCRIPT = textwrap.dedent("""
    import torch, vera_ext
    ops = torch.ops.vera_ext
    g = torch.Generator().manual_seed(0)
    for n in (4, 40):  # the fused decode path (N <= 16) and the GEMM path
        x, base = torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
        A, B = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
        ld, lb = torch.randn(2, 4, generator=g), torch.randn(2, 6, generator=g)
        buf = torch.full((2 * n,), 10**9, dtype=torch.int64)
        buf[::2] = torch.randint(-1, 2, (n,), generator=g)
        idx = buf[::2]  # a valid index vector, every other entry of a bigger buffer
        y, _ = ops.vera_forward(x, base, A, B, ld, lb, idx)
        y_ref, _ = ops.vera_forward(x, base, A, B, ld, lb, idx.contiguous())
        assert torch.equal(y, y_ref), n
    print("ok")
""")


def test_strided_adapter_idx_is_read_by_its_strides():
    # In a subprocess: reading it with the wrong strides crashed the interpreter once.
    result = subprocess.run([sys.executable, "-c", _STRIDED_IDX_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-500:])


@pytest.mark.parametrize("arg", ["x", "A", "lambda_b"])
def test_operand_on_another_device_is_refused(arg):
    case = OpCase(
        *[torch.randn(*s) for s in [(5, 8), (5, 6), (6, 8)]],
        None,
        *[torch.randn(*s) for s in [(4, 8), (6, 4), (4,), (6,)]],
        None,
        fused=False,
    )
    with pytest.raises(RuntimeError, match="must be on the same device"):
        case.call_forward(**{arg: case.tensors()[arg].to("meta")})  # (the error may name x or the operand)


def test_refused_safe_merge_of_several_adapters_changes_nothing():
    from vera_ext import VeraLinear

    torch.manual_seed(0)
    layer = VeraLinear(torch.nn.Linear(6, 5), 4, init_weights=False)
    layer.update_layer("broken", 4, init_weights=False)
    with torch.no_grad():
        layer.vera_lambda_b["broken"][0] = float("nan")
    _expect_refusal(layer, lambda: layer.merge(safe_merge=True, adapter_names=["default", "broken"]), ValueError)


def test_adapter_added_in_eval_mode_does_not_drop_out():
    from vera_ext import VeraLinear

    torch.manual_seed(0)
    layer = VeraLinear(torch.nn.Linear(4, 3), 2, init_weights=False).eval()
    layer.update_layer("b", 2, vera_dropout=0.5, init_weights=False)
    layer.set_adapter("b")
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
