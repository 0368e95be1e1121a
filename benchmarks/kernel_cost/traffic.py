"""What one op case does, traced in the emulated build: every launch of our kernels with its memory traffic
(tests/emulated/emu/emu_trace.h), and every other ATen call the op makes on the device (GEMMs, copies, element-wise
ops, host syncs), in order.

The op runs exactly as the CUDA build runs it (common/vera_impl.h over the kernel primitives), on CPU tensors at
the case's full shapes. GEMMs are recorded but not computed (they return zeros: their cost is modelled, and
computing 8192x4096x4096 products on the CPU would take minutes); our kernels run emulated, and large grids run a
sample of their blocks (`max_blocks`), whose counts are scaled up in `scaled()`.
"""

import json
import math
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import EmulatedOps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ATen ops that launch nothing on a GPU: views, metadata and allocations without a fill (names without the in-place
# suffix: they are compared with the op's name stripped of trailing underscores).
_FREE = frozenset(
    "empty empty_strided empty_like t transpose view unsqueeze squeeze expand select slice as_strided detach alias "
    "_reshape_alias lift_fresh _unsafe_view permute reshape unbind split narrow resize".split()
)
_GEMMS = {"mm", "addmm"}  # what the orchestration calls (at::linear decomposes into them); others run for real


def load_emulator():
    """torch.ops.vera_emu: the emulated build of csrc/cuda (tests/emulated/emu_build.py builds it, ~1 min cold)."""
    sys.path.insert(0, os.path.join(REPO, "tests", "emulated"))
    import emu_build

    return emu_build.load()


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(tree):
    out = []
    for v in tree if isinstance(tree, (list, tuple)) else [tree]:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


class _Recorder(TorchDispatchMode):
    """Records the ATen calls an emulated op makes, with the number of kernel launches traced before each, and
    replaces GEMMs by zeros of their result's shape."""

    def __init__(self, emu):
        super().__init__()
        self.emu = emu
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func.overloadpacket.__name__  # e.g. "mm", "addmm_", "add_", "_local_scalar_dense"
        position = self.emu.trace_launches()
        if base.rstrip("_") in _GEMMS:
            return self._gemm(func, base, args, kwargs, position)
        out = func(*args, **kwargs)
        if base.rstrip("_") in _FREE or func.is_view:
            return out
        if base == "_local_scalar_dense":
            # Reading a value on the host. On the GPU the first read after device work waits for the stream (and
            # copies); the reads right after it find the values on the host already (e.g. `.cpu()` then two
            # `.item()`). Here everything is on the CPU, so only that first read is recorded as a sync.
            if not self.events or self.events[-1]["kind"] != "sync" or position != self.events[-1]["position"]:
                self.events.append({"kind": "sync", "op": str(func), "position": position})
            return out
        # An element-wise or copy kernel: reads its tensor inputs (an in-place op's too), writes its outputs.
        read = sum(_nbytes(t) for t in _tensors(list(args) + list(kwargs.values())))
        write = sum(_nbytes(t) for t in _tensors(out))
        if base.rstrip("_") in ("zeros", "zero", "fill", "new_zeros"):
            read = 0
        self.events.append(
            {"kind": "aten", "op": str(func), "position": position, "read_bytes": read, "write_bytes": write}
        )
        return out

    def _gemm(self, func, base, args, kwargs, position):
        # addmm(c, a, b) / addmm_(c, a, b) / mm(a, b): out (m, n) = a (m, k) @ b (k, n) [+ c]
        if base.startswith("addmm"):
            c, a, b = args[0], args[1], args[2]
        else:
            c, (a, b) = None, args[:2]
        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        e = a.element_size()
        # mm.dtype(a, b, out_dtype): a 16-bit GEMM that writes its fp32 accumulator
        out_dtype = kwargs.get("out_dtype", args[2] if base == "mm" and len(args) > 2 else a.dtype)
        out_e = torch.empty((), dtype=out_dtype).element_size()
        event = {
            "kind": "gemm",
            "op": str(func),
            "position": position,
            "m": m,
            "n": n,
            "k": k,
            "dtype": str(a.dtype).replace("torch.", ""),
            "flops": 2 * m * n * k,
            "read_bytes": (m * k + k * n) * e + (_nbytes(c) if c is not None else 0),
            "write_bytes": m * n * out_e,
        }
        self.events.append(event)
        if base == "addmm_":
            return c
        return torch.zeros(m, n, dtype=out_dtype)


def trace_case(emu, case, max_blocks=64, seed=0):
    """Runs `case` once in the emulated build and returns its events in order: {"kind": "kernel", ...the launch's
    trace...} for our kernels and {"kind": "gemm" | "aten" | "sync", ...} for the other ATen calls."""
    inputs = case.make_inputs("cpu", seed)
    ops = EmulatedOps(emu)
    recorder = _Recorder(emu)
    emu.trace_start(max_blocks)
    try:
        with recorder:
            case.run(ops, inputs)
    finally:
        launches = json.loads(emu.trace_stop())
    events, done = [], 0
    for ev in recorder.events:
        while done < ev["position"]:
            events.append(dict(launches[done], kind="kernel"))
            done += 1
        events.append(ev)
    events += [dict(launch, kind="kernel") for launch in launches[done:]]
    for ev in events:
        ev.pop("position", None)
    return events


def scaled(launch):
    """A traced launch's counts for the whole grid: the sampled blocks' requests, sectors and bytes times
    blocks / executed_blocks; footprint bytes that one sampled block touched scale the same way, bytes that
    several touched (data every block reads: x in decode, lambda) count once. Exact when every block is traced."""
    factor = launch["blocks"] / launch["executed_blocks"]

    def kind(k):
        c = launch[k]
        return {
            "requests": c["requests"] * factor,
            "sectors": c["sectors"] * factor,
            "lane_bytes": c["lane_bytes"] * factor,
        }

    out = {k: kind(k) for k in ("load", "store", "atomic")}
    out["unique_read_bytes"] = launch["unique_read_bytes_private"] * factor + launch["unique_read_bytes_shared"]
    out["unique_write_bytes"] = launch["unique_write_bytes_private"] * factor + launch["unique_write_bytes_shared"]
    out["block_sector_bytes"] = {k: launch["block_unique_sectors"][k] * 32 * factor for k in ("load", "store")}
    out["factor"] = factor
    return out


def sectors_per_request(counts):
    return counts["sectors"] / counts["requests"] if counts["requests"] else math.nan
