"""--trace: each case's implementations run under torch.profiler, one Chrome trace (JSON) per case.

Each implementation's calls sit inside ``record_function("bench/<case>/<impl>")`` (and, on CUDA, an NVTX range of
the same name, for Nsight Systems), so the trace shows which ops each one ran; ours appear by their dispatcher
names, ``vera_ext::vera_linear_forward`` and so on. Open the files in chrome://tracing or https://ui.perfetto.dev.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .cases import Case
from .timing import sync


def nvtx_range(name: str, device: str):
    """An NVTX range on CUDA (visible in nsys), nothing on the CPU."""
    return torch.cuda.nvtx.range(name) if device == "cuda" else contextlib.nullcontext()


def trace_case(case: Case, device: str, out_dir: str, calls: int = 3) -> str:
    """Profile ``calls`` calls of each implementation of ``case`` (already warmed up); returns the trace's path."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        with case.mode():
            for impl, fn in case.fns.items():
                label = f"bench/{case.name}/{impl}"
                with record_function(label), nvtx_range(label, device):
                    for _ in range(calls):
                        fn()
                    sync(device)
    path = os.path.join(out_dir, f"{case.name}.json")
    prof.export_chrome_trace(path)
    return path
