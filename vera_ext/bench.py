"""Side-by-side benchmark: the base layer alone vs PEFT's VeRA vs vera_ext, measured in one process.

Implementations run interleaved (one timed call of each per round) so that machine noise hits all of them alike;
each reports the median over rounds and the ratio to PEFT measured in the same rounds. Memory is the activation
memory saved for backward, in bytes that grow with N (parameters and frozen buffers excluded).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .layer import VeraLinear
from .projection import VeraProjection


@dataclass
class Result:
    case: str
    shape: dict
    dtype: str
    device: str
    implementation: str
    median_ms: float
    spread_ms: float  # interquartile range
    ratio_to_base: Optional[float] = None
    ratio_to_peft: Optional[float] = None
    saved_bytes: Optional[int] = None
    extra: dict = field(default_factory=dict)


def build_layers(in_f: int, out_f: int, r: int, dtype: torch.dtype, device: str, seed: int = 0):
    """(base, peft_layer or None, ours) around identical weights and one projection, lambdas non-trivial."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(device, dtype).requires_grad_(False)
    proj = VeraProjection.from_key(r, in_f, out_f, prng_key=seed).to(device)
    ours = VeraLinear(copy.deepcopy(base), r, projection=proj, init_weights=False)
    peft = None
    try:
        from peft import VeraConfig, get_peft_model

        holder = nn.Sequential()
        holder.add_module("layer", copy.deepcopy(base))
        peft_model = get_peft_model(holder, VeraConfig(r=r, target_modules=["layer"], init_weights=False,
                                                       projection_prng_key=seed))
        peft = peft_model.base_model.model.layer
        with torch.no_grad():
            peft.vera_lambda_d["default"].copy_(ours.vera_lambda_d["default"])
            peft.vera_lambda_b["default"].copy_(ours.vera_lambda_b["default"])
    except ImportError:
        pass
    return base, peft, ours


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int, inner: int, warmup: int = 3):
    """Median and IQR in ms per call for each fn, all run in the same rounds (CUDA events on the GPU)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = (statistics.median(s), q[2] - q[0])
    return out


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward, excluding parameters, buffers and the projection's cached
    casts (none of which grow with N); tensors sharing storage are counted once."""
    frozen_tensors = list(layer.parameters()) + list(layer.buffers())
    for module in layer.modules():
        if isinstance(module, VeraProjection):
            frozen_tensors += module.cached_tensors()
    frozen = {t.untyped_storage().data_ptr() for t in frozen_tensors}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen and t.numel() > 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def _ratios(results: list[Result]) -> None:
    by = {r.implementation: r for r in results}
    for r in results:
        if "base" in by:
            r.ratio_to_base = r.median_ms / by["base"].median_ms
        if "peft" in by:
            r.ratio_to_peft = r.median_ms / by["peft"].median_ms


def bench_training(n, in_f, out_f, r, dtype, device, rounds, inner=1) -> list[Result]:
    """Forward and forward+backward of one layer; lambdas and x require grad, the base is frozen."""
    base, peft, ours = build_layers(in_f, out_f, r, dtype, device)
    impls = {"base": base, "vera_ext": ours} | ({"peft": peft} if peft is not None else {})
    xs = [torch.randn(n, in_f, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    grad = torch.randn(n, out_f, device=device, dtype=dtype)
    rot = {"i": 0}

    def pick():
        rot["i"] ^= 1
        return xs[rot["i"]]

    def fwd(layer):
        return lambda: layer(pick())

    def fwd_bwd(layer):
        return lambda: layer(pick()).backward(grad)

    shape = {"N": n, "I": in_f, "O": out_f, "r": r}
    results = []
    for case, make in (("train_fwd", fwd), ("train_fwd_bwd", fwd_bwd)):
        timings = time_interleaved({k: make(m) for k, m in impls.items()}, device, rounds, inner)
        rows = [Result(case, shape, str(dtype).replace("torch.", ""), device, k, *timings[k]) for k in impls]
        _ratios(rows)
        results += rows
    mem = [Result("saved_activations", shape, str(dtype).replace("torch.", ""), device, k, 0.0, 0.0,
                  saved_bytes=saved_activation_bytes(m, xs[0])) for k, m in impls.items()]
    results += mem
    return results


def bench_decode(n, in_f, out_f, r, dtype, device, rounds, inner=20) -> list[Result]:
    """Inference forward at small N (serving), no autograd."""
    base, peft, ours = build_layers(in_f, out_f, r, dtype, device)
    impls = {"base": base, "vera_ext": ours} | ({"peft": peft} if peft is not None else {})
    x = torch.randn(n, in_f, device=device, dtype=dtype)
    with torch.inference_mode():
        timings = time_interleaved({k: (lambda m=m: m(x)) for k, m in impls.items()}, device, rounds, inner)
    rows = [Result("decode", {"N": n, "I": in_f, "O": out_f, "r": r}, str(dtype).replace("torch.", ""), device, k,
                   *timings[k]) for k in impls]
    _ratios(rows)
    return rows


def bench_merge(in_f, out_f, r, dtype, device, rounds) -> list[Result]:
    _, peft, ours = build_layers(in_f, out_f, r, dtype, device)
    impls = {"vera_ext": ours} | ({"peft": peft} if peft is not None else {})

    def merge_unmerge(layer):
        def run():
            layer.merge()
            layer.unmerge()
        return run

    timings = time_interleaved({k: merge_unmerge(m) for k, m in impls.items()}, device, rounds, 1)
    rows = [Result("merge+unmerge", {"I": in_f, "O": out_f, "r": r}, str(dtype).replace("torch.", ""), device, k,
                   *timings[k]) for k in impls]
    _ratios(rows)
    return rows


def format_table(results: list[Result]) -> str:
    lines = [f"{'case':<18} {'shape':<28} {'impl':<9} {'median ms':>10} {'IQR':>8} {'/base':>7} {'/peft':>7} "
             f"{'saved MiB':>10}"]
    for r in results:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        fmt = lambda v: f"{v:7.3f}" if v is not None else f"{'':>7}"  # noqa: E731
        mib = f"{r.saved_bytes / 2**20:10.2f}" if r.saved_bytes is not None else f"{'':>10}"
        ms = f"{r.median_ms:10.3f} {r.spread_ms:8.3f}" if r.saved_bytes is None else f"{'':>10} {'':>8}"
        lines.append(f"{r.case:<18} {shape:<28} {r.implementation:<9} {ms} {fmt(r.ratio_to_base)} "
                     f"{fmt(r.ratio_to_peft)} {mib}")
    return "\n".join(lines)


def run_default_suite(device: str, quick: bool) -> list[Result]:
    """The foundation's targets: training at N=2048, 1024x1024, r=256, fp32; decode at N=1; merge."""
    rounds = 5 if quick else 15
    n_train = 256 if quick else 2048
    results = bench_training(n_train, 1024, 1024, 256, torch.float32, device, rounds)
    results += bench_decode(1, 1024, 1024, 256, torch.float32, device, rounds)
    results += bench_merge(1024, 1024, 256, torch.float32, device, max(3, rounds // 3))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_ext bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small N and few rounds: a seconds-long run")
    parser.add_argument("--json", metavar="PATH", help="write the result records as a JSON list")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    results = run_default_suite(args.device, args.quick)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0
