"""How the benchmark measures: interleaved timing, the machine's ceilings, and activation memory saved for backward.

Implementations run interleaved (one timed sample of each per round) so that machine noise hits all of them alike;
each reports the median and interquartile range over rounds. On CUDA a sample is timed with events after warm-up;
on the CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..projection import VeraProjection

#: A sample should last at least this long (seconds) so that timer resolution and per-sample overhead vanish.
MIN_SAMPLE_S = {"cpu": 2e-3, "cuda": 5e-4}
MAX_INNER = 200


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _one_sample(fn: Callable[[], object], device: str, inner: int) -> float:
    """Milliseconds per call of ``inner`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def inner_for(fastest_ms: float, device: str) -> int:
    """Calls per sample, the same for every fn (a fair comparison): enough that the fastest fn's sample lasts
    MIN_SAMPLE_S."""
    return max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_S[device] * 1e3 / max(fastest_ms, 1e-6))))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str,
    rounds: int,
    inner: Optional[int] = None,
    warmup: int = 3,
    before_each: Optional[Callable[[], object]] = None,
    samples_out: Optional[dict[str, list[float]]] = None,
) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, IQR ms)}`` per call for each fn, all run in the same rounds. ``samples_out``, when
    given, receives every fn's samples (ms per call) in round order, for statistics over paired samples.

    ``inner`` calls make one sample (None: enough that the fastest fn's sample lasts a few ms on the CPU, 0.5 ms
    on CUDA, judged from its last warm-up call). Every fn is warmed up ``max(1, warmup)`` times first (allocator,
    caches, cuBLAS heuristics, clocks).

    Each sample is preceded by ``inner // 4`` untimed calls of the same fn: every implementation holds its own
    weights, and the previous implementation's sample evicts them from the caches. Without these calls a sample
    of short calls measures mostly that refill (measured here, N=1 decode at I=O=1024, r=256: the first calls after
    a switch took 400-800 us against 66-160 us for the following ones, for every implementation).

    ``before_each``: called untimed (and synchronized) before every single timed call, which makes ``inner`` 1 and
    skips the settling calls: for a case that must start from a given state, e.g. caches evicted.
    """
    last_ms = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup) - 1):
            fn()
        sync(device)
        last_ms[name] = _one_sample(fn, device, 1)
    if before_each is not None:
        inner = 1
    elif inner is None:
        inner = inner_for(min(last_ms.values()), device)
    settle = 0 if before_each is not None else inner // 4
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            if before_each is not None:
                before_each()
            sync(device)
            samples[name].append(_one_sample(fn, device, inner))
    if samples_out is not None:
        samples_out.update(samples)
    return {name: median_iqr(s) for name, s in samples.items()}


def median_iqr(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``samples``; the IQR is 0 for a single sample."""
    if len(samples) < 2:
        return samples[0], 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q3 - q1


def _best_ms(fn: Callable[[], object], device: str, rounds: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    return min(_one_sample(fn, device, 1) for _ in range(rounds))


def measure_ceilings(device: str, dtype: torch.dtype, gemm_n: int, copy_mib: int, rounds: int = 5) -> dict:
    """The machine's achieved GEMM rate in ``dtype`` (an n^3 mm of random data) and memory bandwidth (a copy of
    ``copy_mib`` MiB, bytes read plus written), measured once per run: the denominators of every floor. The best
    of ``rounds`` samples: a ceiling is what the machine can do, and on a shared machine slower samples are
    interference."""
    a, b = (torch.randn(gemm_n, gemm_n, device=device).to(dtype) for _ in range(2))
    gemm_ms = _best_ms(lambda: torch.mm(a, b), device, rounds)
    src = torch.randn(copy_mib * 2**18, device=device)  # fp32: 4 bytes an element
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, rounds)
    return {
        "gemm_flops_per_s": 2 * gemm_n**3 / (gemm_ms * 1e-3),
        "gemm_n": gemm_n,
        "copy_bytes_per_s": 2 * src.numel() * 4 / (copy_ms * 1e-3),
        "copy_mib": copy_mib,
    }


def floor_ms(flops: int, bytes_moved: int, ceilings: dict) -> float:
    """The time no implementation can beat on this machine: max(FLOPs / GEMM rate, bytes / bandwidth)."""
    return max(flops / ceilings["gemm_flops_per_s"], bytes_moved / ceilings["copy_bytes_per_s"]) * 1e3


def saved_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while ``run()`` (one forward of ``model``) executes: every distinct storage
    saved, counted once at its full size however many tensors or views of it are saved, excluding the storages of
    ``model``'s parameters and buffers and of vera_ext's cached casts of its projection (fixed-size state, not
    activations). Empty tensors count nothing."""
    fixed = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if isinstance(module, VeraProjection):
            fixed += module.cached_tensors()
    excluded = {t.untyped_storage().data_ptr() for t in fixed}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and t.numel() > 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor, **forward_kwargs) -> int:
    """:func:`saved_bytes` of one forward of ``layer`` on ``x``."""
    return saved_bytes(layer, lambda: layer(x, **forward_kwargs))
