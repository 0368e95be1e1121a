"""Low-precision numerics against PEFT 0.21.2 and float64 (bf16 and fp16 lambda gradients as good as PEFT's).

Each case is a random layer as a new user would make one (dims 1-257, r 1-300, 0-3 leading dims of x, bias on or
off) trained in bf16 or fp16 the two ways PEFT users do: under autocast with fp32 weights, or with the whole model
cast to the low dtype. The float64 reference is the VeRA layer evaluated on the very operands both implementations
consume (x, W, A and B as rounded to the compute dtype, the lambdas as stored), so an error measures the computation
alone, not the rounding of the inputs both share. Our lambda gradients must be within twice PEFT's error.

A second check: a row's forward result has the same precision whatever the batch it is in (the fused small-batch
path and the GEMM path round the same intermediates; docs/DESIGN.md §5).
"""

import copy
import random

import pytest
import torch
from torch import nn

from vera_ext import ops

from vera_models import ours, peft_model

DTYPES = [torch.bfloat16, torch.float16]
SETTINGS = ["autocast", "cast"]
CONFIGS = 40


def random_config(seed):
    rng = random.Random(seed)
    return {
        "in_f": rng.randint(1, 257),
        "out_f": rng.randint(1, 257),
        "r": rng.randint(1, 300),
        "lead": [rng.randint(1, 6) for _ in range(rng.randint(0, 3))],
        "bias": rng.random() < 0.5,
    }


def lambda_grads(model, x, grad_y, dtype, setting):
    model.zero_grad()
    if setting == "autocast":
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
    else:
        y = model(x.to(dtype))
    y.backward(grad_y.to(y.dtype))
    return {n.rsplit(".", 2)[-2]: p.grad.double() for n, p in model.named_parameters() if "vera_lambda" in n}


def reference_lambda_grads(peft, x, grad_y, dtype, setting):
    """float64 gradients of the VeRA layer on the operands as the low-precision computation sees them."""
    layer = peft.base_model.model[0]
    low = (lambda t: t.to(dtype).double()) if setting == "autocast" else (lambda t: t.double())
    in_f, out_f = layer.in_features, layer.out_features
    W, b = low(layer.base_layer.weight), layer.base_layer.bias
    A = low(layer.vera_A["default"][:, :in_f])
    B = low(layer.vera_B["default"][:out_f, :])
    ld = layer.vera_lambda_d["default"].detach().double().requires_grad_(True)
    lb = layer.vera_lambda_b["default"].detach().double().requires_grad_(True)
    xd = low(x) if setting == "autocast" else x.to(dtype).double()
    y = xd @ W.T + (low(b) if b is not None else 0) + lb * (((xd @ A.T) * ld) @ B.T)
    y.backward(grad_y.to(dtype).double())
    return {"vera_lambda_d": ld.grad, "vera_lambda_b": lb.grad}


def one_case(seed, dtype, setting):
    c = random_config(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(c["in_f"], c["out_f"], bias=c["bias"]))
    kw = dict(r=c["r"], target_modules=["0"], projection_prng_key=seed, init_weights=False)
    peft, mine = peft_model(copy.deepcopy(base), **kw), ours(copy.deepcopy(base), **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the same non-trivial lambdas in both
        for (name, p), (name2, q) in zip(sorted(peft.named_parameters()), sorted(mine.named_parameters())):
            if "vera_lambda" in name:
                assert name.rsplit(".", 2)[-2] == name2.rsplit(".", 2)[-2]
                p.copy_(torch.randn(p.shape, generator=g))
                q.copy_(p)
    if setting == "cast":
        peft.to(dtype)
        mine.to(dtype)
    x = torch.randn(*c["lead"], c["in_f"], generator=g)
    grad_y = torch.randn(*c["lead"], c["out_f"], generator=g)
    ref = reference_lambda_grads(peft, x, grad_y, dtype, setting)
    theirs = lambda_grads(peft, x, grad_y, dtype, setting)
    got = lambda_grads(mine, x, grad_y, dtype, setting)
    out = {}
    for name in ("vera_lambda_d", "vera_lambda_b"):
        scale = ref[name].abs().max().item()
        out[name] = ((got[name] - ref[name]).abs().max().item(), (theirs[name] - ref[name]).abs().max().item(), scale)
    return c, out


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_lambda_gradients_within_twice_peft_error(dtype, setting):
    failures = []
    for seed in range(CONFIGS):
        c, errors = one_case(seed, dtype, setting)
        for name, (ours_err, peft_err, scale) in errors.items():
            # a floor of a few fp32 ulps of the gradient's scale for cases both compute almost exactly
            if ours_err > 2 * peft_err + 8 * torch.finfo(torch.float32).eps * scale:
                failures.append(f"seed {seed} {c}: {name} error {ours_err:.3g}, PEFT {peft_err:.3g}")
    assert not failures, "\n".join(failures)


def forward_case(seed, dtype, mixed):
    c = random_config(seed)
    g = torch.Generator().manual_seed(seed)
    i, o, r = c["in_f"], c["out_f"], c["r"]
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, A, B = rand(64, i), rand(r, i) / i**0.5, rand(o, r) / r**0.5
    k = 3 if mixed else 1
    ld, lb = torch.randn(k, r, generator=g), torch.randn(k, o, generator=g)
    idx = torch.randint(0, k, (64,), generator=g) if mixed else None
    if not mixed:
        ld, lb = ld[0], lb[0]
    return x, A, B, ld, lb, idx


def row0_error(x, A, B, ld, lb, idx, rows):
    """Error of row 0's adapter term (base_out = 0) computed in a batch of `rows` rows, against float64."""
    xs = x[:rows]
    idx_rows = idx[:rows] if idx is not None else None
    y = ops.vera_forward(xs, torch.zeros(rows, B.shape[0], dtype=x.dtype), A, B, ld, lb, idx_rows)
    ld0 = ld[idx[0]] if idx is not None else ld
    lb0 = lb[idx[0]] if idx is not None else lb
    ref = lb0.double() * (((x[0].double() @ A.double().T) * ld0.double()) @ B.double().T)
    return (y[0].double() - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one_adapter", "mixed"])
def test_a_rows_precision_does_not_depend_on_the_batch(dtype, mixed):
    """Row 0 alone (the fused small-batch path) and in a batch of 64 (the GEMM path): over many random layers the
    errors are of one size, neither path systematically more precise (their ratio's geometric mean within 1.5x)."""
    log_ratios = []
    for seed in range(CONFIGS):
        case = forward_case(seed, dtype, mixed)
        small, scale = row0_error(*case, rows=1)  # every backend's fused path takes one row
        large, _ = row0_error(*case, rows=64)
        floor = torch.finfo(dtype).eps * scale * 1e-3  # cases whose result is exact in both
        log_ratios.append(torch.tensor((small + floor) / (large + floor)).log())
    mean_ratio = torch.stack(log_ratios).mean().exp().item()
    assert 1 / 1.5 <= mean_ratio <= 1.5, (
        f"row alone / row in a batch of 64: geometric-mean error ratio {mean_ratio:.3g}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_mixed_batch_row_rounds_like_the_gemm_path(dtype):
    """With per-row adapters both paths round the same intermediates (u, h) and keep z and the lambda_b product in
    fp32 before y's one rounding: a row computed alone equals the same row in a batch of 64 except where the two
    fp32 summation orders round across a tie (a fused pass that kept h in fp32 matched in about half the entries)."""
    equal = []
    for seed in range(CONFIGS):
        x, A, B, ld, lb, idx = forward_case(seed, dtype, mixed=True)
        zeros = torch.zeros(64, B.shape[0], dtype=dtype)
        batch = ops.vera_forward(x, zeros, A, B, ld, lb, idx)
        alone = ops.vera_forward(x[:1], zeros[:1], A, B, ld, lb, idx[:1])
        equal.append((alone[0] == batch[0]).float().mean().item())
    assert sum(equal) / len(equal) >= 0.95, f"mean fraction of equal entries {sum(equal) / len(equal):.3f}"
