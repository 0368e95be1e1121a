"""Issue 4's GPU benchmark: base nn.Linear vs PEFT's VeRA vs vera_ext, side by side in one process.

    python benchmarks/gpu_bench.py                  # the issue's cases on CUDA (about a minute on an H200)
    python benchmarks/gpu_bench.py --device cpu     # dry run at tiny shapes: exercises the logic, numbers mean nothing

Writes $OUT/gpu_bench.json and $OUT/gpu_bench.log ($OUT defaults to ./gpu_out) and prints a short table last.

Method. Implementations are timed interleaved, one timed sample of each per round (vera_ext.bench.time_interleaved:
CUDA events, warm-up, median and interquartile range). The GPU's two ceilings are measured first, in the same
process: the bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth. Each case reports its floor
and our ratio to it: training, FLOPs (base + adapter) / GEMM rate; decode, max(FLOPs / rate, bytes of W / copy
bandwidth); merge, the measured fp32 GEMM of the same shape.

 - PEFT runs as a user runs it: get_peft_model on a bf16 model with its defaults (autocast_adapter_dtype=True, so
   the adapter computes in fp32). vera_ext runs in bf16 with fp32 lambdas. Both get the same lambdas and projection.
 - Training (N=8192, I=O=4096, r=256): x and the lambdas require grad, the base weight is frozen; forward+backward
   is y = layer(x); autograd.grad(y, [x, lambdas], g) (no .grad accumulation). Three input sets rotate.
 - Decode (N=1, 4, 16): a stack of 8 distinct layers sharing one projection, as in a model: the 8 weights (256 MiB)
   stream from HBM while the shared A and B stay L2-resident, which is the design point (no input rotation: x is
   tiny). With 1000 adapters, each of the N rows uses a different adapter out of 1000 (PEFT cannot mix adapters in a
   batch; its single-adapter time is shown). Eager, and CUDA-graph replay of the same call on static inputs; their
   difference is the eager launch overhead. Times are per layer.
 - Merge: merge and unmerge alternate (sample = their mean) over the 8 decode layers in turn, vs one fp32 torch.mm
   of (O x r) @ (r x I), the GEMM every merge needs.
Targets are reported, not enforced: the exit status is 0 when every section ran, 1 when one raised, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

SHAPES = {
    "cuda": dict(n_train=8192, dim=4096, r=256, layers=8, adapters=1000, gemm=8192, copy_mib=1024, rounds=30,
                 graphs=True),
    "cpu": dict(n_train=64, dim=128, r=16, layers=2, adapters=50, gemm=256, copy_mib=8, rounds=5, graphs=False),
}
DECODE_NS = (1, 4, 16)
DTYPE = torch.bfloat16


@dataclass
class Row:
    case: str
    impl: str
    mode: str  # eager | graph
    us: float  # median per call (per layer for decode), microseconds
    iqr_us: float
    floor_us: Optional[float] = None
    x_base: Optional[float] = None
    x_peft: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def x_floor(self) -> Optional[float]:
        return self.us / self.floor_us if self.floor_us else None


class Log:
    def __init__(self, path: str):
        self.file = open(path, "w")

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


import vera_ext  # noqa: E402
from vera_ext import bench, ops  # noqa: E402
from vera_ext import VeraLinear, VeraProjection  # noqa: E402


def timed(fns: dict[str, Callable], device: str, rounds: int, inner: int = 1, per: int = 1) -> dict:
    """{name: (median us, IQR us)} per call / per, interleaved across fns."""
    out = bench.time_interleaved(fns, device, rounds, inner, warmup=3)
    return {k: (m * 1e3 / per, s * 1e3 / per) for k, (m, s) in out.items()}


def graph_of(fn: Callable) -> Callable:
    """CUDA-graph capture of fn on its static inputs (after warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------- layer building


def peft_stack(bases: list[nn.Linear], r: int):
    """PEFT's VeRA over copies of `bases` (bf16, on their device) via get_peft_model with its defaults, as a user
    would; init_weights=False so lambda_b != 0. Returns the wrapped layers (one shared projection)."""
    from peft import VeraConfig, get_peft_model

    holder = nn.Sequential(*[copy.deepcopy(b) for b in bases])
    names = [str(i) for i in range(len(bases))]
    model = get_peft_model(holder, VeraConfig(r=r, target_modules=names, init_weights=False, projection_prng_key=0))
    return [model.base_model.model[i] for i in range(len(bases))]


def ours_like(peft_layers, bases: list[nn.Linear], r: int) -> list[VeraLinear]:
    """vera_ext layers over copies of `bases` with PEFT's projection and lambdas (the same function)."""
    first = peft_layers[0]
    proj = VeraProjection(*(t["default"].detach().float().clone() for t in (first.vera_A, first.vera_B)))
    layers = []
    for base, p in zip(bases, peft_layers):
        layer = VeraLinear(copy.deepcopy(base), r, projection=proj, init_weights=False)
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(p.vera_lambda_d["default"])
            layer.vera_lambda_b["default"].copy_(p.vera_lambda_b["default"])
        layers.append(layer)
    return layers


def make_bases(count: int, dim: int, device: str) -> list[nn.Linear]:
    return [nn.Linear(dim, dim, bias=False, device=device, dtype=DTYPE).requires_grad_(False) for _ in range(count)]


def lambdas(layer) -> list[torch.Tensor]:
    return [layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]]


# ------------------------------------------------------------------------------------------------- sections


def ceilings(device: str, s: dict, log: Log) -> dict:
    n = s["gemm"]
    a, b = (torch.randn(n, n, device=device, dtype=DTYPE) for _ in range(2))
    # inner=5 x 10 rounds after warm-up: long enough for the clocks to come up from idle
    t = timed({"gemm": lambda: torch.mm(a, b)}, device, rounds=10, inner=5)["gemm"][0]
    rate = 2 * n**3 / (t * 1e-6)
    src = torch.randn(s["copy_mib"] * 2**18, device=device)
    dst = torch.empty_like(src)
    tc = timed({"copy": lambda: dst.copy_(src)}, device, rounds=max(5, s["rounds"] // 3))["copy"][0]
    bw = 2 * src.numel() * 4 / (tc * 1e-6)
    log(f"ceilings: bf16 GEMM {n}^3 {rate / 1e12:.1f} TFLOP/s ({t:.0f} us); device copy {bw / 1e12:.2f} TB/s "
        f"(read+write of {s['copy_mib']} MiB in {tc:.0f} us)")
    return {"bf16_gemm_flops_per_s": rate, "gemm_n": n, "copy_bytes_per_s": bw}


def training(device: str, s: dict, ceil: dict, log: Log, info: dict) -> list[Row]:
    n, dim, r = s["n_train"], s["dim"], s["r"]
    base = make_bases(1, dim, device)[0]
    peft = peft_stack([base], r)[0]
    ours = ours_like([peft], [base], r)[0]
    impls = {"base": (base, []), "peft": (peft, lambdas(peft)), "vera_ext": (ours, lambdas(ours))}
    info["peft_dtypes"] = {"lambda": str(peft.vera_lambda_d["default"].dtype),
                           "vera_A": str(peft.vera_A["default"].dtype),
                           "base_weight": str(peft.base_layer.weight.dtype)}

    xs = [torch.randn(n, dim, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3)]
    gs = [torch.randn(n, dim, device=device, dtype=DTYPE) for _ in range(3)]
    turn = {"i": 0}

    def next_pair():
        turn["i"] = (turn["i"] + 1) % len(xs)
        return xs[turn["i"]], gs[turn["i"]]

    def fwd(layer, _params):
        return lambda: layer(next_pair()[0])

    def fwd_bwd(layer, params):
        def run():
            x, g = next_pair()
            torch.autograd.grad(layer(x), [x] + params, g)
        return run

    with torch.no_grad():
        y_base, y_peft, y_ours = base(xs[0]), peft(xs[0]), ours(xs[0])
    info["train_check"] = {"ours_vs_peft_output": rel(y_ours, y_peft),
                           "ours_vs_peft_adapter_term": rel(y_ours - y_base, y_peft - y_base)}

    base_f, adapter_f = 2 * n * dim * dim, 2 * n * r * (dim + dim)
    flops = {"fwd": (base_f, adapter_f), "fwd+bwd": (2 * base_f, adapter_f + 2 * n * r * (dim + 2 * dim))}
    rows = []
    for case, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        t = timed({k: make(*v) for k, v in impls.items()}, device, s["rounds"])
        label = f"train {case} N={n} I=O={dim} r={r}"
        for k in impls:
            f = flops[case][0] + (flops[case][1] if k != "base" else 0)
            rows.append(Row(label, k, "eager", *t[k], floor_us=f / ceil["bf16_gemm_flops_per_s"] * 1e6,
                            extra={"flops": f}))
    saved = {k: bench.saved_activation_bytes(m, xs[0]) for k, (m, _) in impls.items()}
    info["saved_activation_bytes"] = saved
    log(f"training: output rel err vera_ext vs peft {info['train_check']['ours_vs_peft_output']:.2e} (adapter term "
        f"{info['train_check']['ours_vs_peft_adapter_term']:.2e}); saved activations MiB: "
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in saved.items()))
    return rows


def decode(device: str, s: dict, ceil: dict, log: Log, info: dict, stacks: dict) -> list[Row]:
    dim, r, count, k_adapters = s["dim"], s["r"], s["layers"], s["adapters"]
    bases = make_bases(count, dim, device)
    peft = peft_stack(bases, r)
    ours = ours_like(peft, bases, r)
    many = ours_like(peft, bases, r)  # the same layers, with k_adapters adapters each
    names = ["default"] + [f"a{i}" for i in range(1, k_adapters)]
    for layer in many:
        for name in names[1:]:
            layer.add_adapter(name, r, init_weights=False)
    tables = [(torch.stack([m.vera_lambda_d[n] for n in names]).detach(),
               torch.stack([m.vera_lambda_b[n] for n in names]).detach()) for m in many]
    proj_A, proj_B = many[0].vera_projection.sliced(r, dim, dim, DTYPE, torch.device(device))
    for layer in bases + peft + ours + many:
        layer.eval()
    stacks.update(peft=peft, ours=ours, many=many)

    def chain(layers, **kw):
        def run():
            y = x_static
            for layer in layers:
                y = layer(y, **kw)
            return y
        return run

    def chain_ops(idx):
        def run():
            y = x_static
            for layer, (ld, lb) in zip(many, tables):
                y = ops.vera_linear_forward(y, layer.base_layer.weight, None, proj_A, proj_B, ld, lb, idx)
            return y
        return run

    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in DECODE_NS:
        x_static = torch.randn(n, dim, device=device, dtype=DTYPE)
        picks = torch.randperm(k_adapters, generator=gen)[:n]
        idx = picks.to(device)
        row_names = [names[i] for i in picks.tolist()]
        eager = {"base": chain(bases), "peft": chain(peft), "vera_ext": chain(ours),
                 f"vera_ext K={k_adapters} layer": chain(many, adapter_names=row_names),
                 f"vera_ext K={k_adapters} op": chain_ops(idx)}
        with torch.no_grad():
            outs = {k: fn() for k, fn in eager.items()}
            ref = outs[f"vera_ext K={k_adapters} layer"]
            info.setdefault("decode_check", {})[f"N={n}"] = {
                "vera_ext_vs_peft": rel(outs["vera_ext"], outs["peft"]),
                "mixed_op_vs_mixed_layer": rel(outs[f"vera_ext K={k_adapters} op"], ref)}
            modes = {"eager": timed(eager, device, s["rounds"], inner=5, per=count)}
            if s["graphs"]:
                graphs, failed = {}, {}
                for k, fn in eager.items():
                    if k.endswith(" layer"):
                        continue  # builds the row-index tensor on the host each call: not capturable (see probe)
                    try:
                        graphs[k] = graph_of(fn)
                    except Exception as err:  # report and go on: one impl's capture must not end the run
                        failed[k] = f"{type(err).__name__}: {err}"
                if failed:
                    info.setdefault("graph_capture_failed", {})[f"N={n}"] = failed
                    log(f"decode N={n}: graph capture failed for {failed}")
                modes["graph"] = timed(graphs, device, s["rounds"], inner=20, per=count)
        w_bytes = dim * dim * DTYPE.itemsize
        for mode, t in modes.items():
            for k, (us, iqr) in t.items():
                f = 2 * n * dim * dim + (0 if k == "base" else 2 * n * r * 2 * dim)
                io = w_bytes + 2 * n * dim * DTYPE.itemsize
                floor = max(f / ceil["bf16_gemm_flops_per_s"], io / ceil["copy_bytes_per_s"]) * 1e6
                extra = {"flops_per_layer": f, "hbm_bytes_per_layer": io}
                if mode == "eager" and k in modes.get("graph", {}):
                    extra["launch_overhead_us"] = us - modes["graph"][k][0]
                rows.append(Row(f"decode N={n} (per layer)", k, mode, us, iqr, floor_us=floor, extra=extra))
    return rows


def merge(device: str, s: dict, log: Log, stacks: dict) -> list[Row]:
    dim, r = s["dim"], s["r"]
    ours, peft, spare = stacks["ours"], stacks["peft"], stacks["many"]
    proj = ours[0].vera_projection  # fp32, as VeraLinear keeps it; merge reads it in place
    A, B = proj.vera_A[:r, :dim], proj.vera_B[:dim, :r]
    ld, lb = (t.detach() for t in lambdas(ours[0]))
    b_hat, a_hat = (B * lb[:, None]).contiguous(), (A * ld[:, None]).contiguous()

    def alternate(layers):  # each call merges or unmerges the next layer, whichever it needs
        turn = {"i": 0}

        def run():
            layer = layers[turn["i"] % len(layers)]
            turn["i"] += 1
            layer.unmerge() if layer.merged else layer.merge()
        return run

    def op_merge():  # the op alone, on weights of a stack no other case touches: +1 on one pass, -1 on the next
        turn = {"i": 0}

        def run():
            i = turn["i"]
            turn["i"] += 1
            sign = 1.0 if (i // len(spare)) % 2 == 0 else -1.0
            ops.vera_merge_(spare[i % len(spare)].base_layer.weight.data, A, B, ld, lb, sign, False, False)
        return run

    fns = {"fp32 GEMM torch.mm": lambda: torch.mm(b_hat, a_hat), "vera_ext op": op_merge(),
           "vera_ext layer": alternate(ours), "peft layer": alternate(peft)}
    with torch.no_grad():
        t = timed(fns, device, max(10, s["rounds"] // 2), inner=2)
    gemm_us = t["fp32 GEMM torch.mm"][0]
    label = f"merge W {dim}x{dim} bf16, r={r}"
    return [Row(label, k, "eager", us, iqr, floor_us=gemm_us, extra={"floor": "fp32 GEMM of the same shape"})
            for k, (us, iqr) in t.items()]


def graph_probe(device: str, s: dict, stacks: dict) -> str:
    """Can a user capture VeraLinear's mixed-batch call (adapter_names) in a CUDA graph? Run last: a failed capture
    is harmless, but nothing should depend on the context after it."""
    layer = stacks["many"][0]  # never merged (the merge case changes its weights through the op only)
    x = torch.randn(4, s["dim"], device=device, dtype=DTYPE)
    try:
        with torch.no_grad():
            graph_of(lambda: layer(x, adapter_names=["default", "__base__", "a1", "default"]))
        return "captured"
    except Exception as err:
        return f"not capturable: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


# ---------------------------------------------------------------------------------------------------- report


def add_ratios(rows: list[Row]) -> None:
    for r in rows:
        same = {x.impl: x for x in rows if x.case == r.case and x.mode == r.mode}
        if "base" in same:
            r.x_base = r.us / same["base"].us
        if "peft" in same:
            r.x_peft = r.us / same["peft"].us
        elif "peft layer" in same:
            r.x_peft = r.us / same["peft layer"].us


def targets(rows: list[Row], k: int) -> list[dict]:
    def find(case_start, impl, mode="eager"):
        return next((r for r in rows if r.case.startswith(case_start) and r.impl == impl and r.mode == mode), None)

    out = []

    def add(name, value, op, bound):
        if value is not None:
            met = value >= bound if op == ">=" else value <= bound
            out.append({"target": name, "value": value, "bound": f"{op} {bound}", "met": met})

    ours, peft = find("train fwd+bwd", "vera_ext"), find("train fwd+bwd", "peft")
    if ours and peft:
        add("train fwd+bwd: PEFT time / vera_ext time", peft.us / ours.us, ">=", 1.5)
        add("train fwd+bwd: vera_ext / FLOP floor", ours.x_floor, "<=", 1.10)
    for n in DECODE_NS:
        for mode in ("graph", "eager"):
            r = find(f"decode N={n} ", f"vera_ext K={k} op", mode)
            if r:
                tail = "" if mode == "graph" else " (info: the target applies to graph replay)"
                add(f"decode N={n}, {k} adapters, {mode}: vera_ext / base alone{tail}", r.x_base, "<=", 1.15)
    r = find("merge", "vera_ext op")
    if r:
        add("merge: vera_ext op / fp32 GEMM of the same shape", r.x_floor, "<=", 1.2)
    r = find("merge", "vera_ext layer")
    if r:
        add("merge: VeraLinear.merge() / fp32 GEMM (info)", r.x_floor, "<=", 1.2)
    return out


def table(rows: list[Row]) -> str:
    def f(v, spec="7.2f"):
        return format(v, spec) if v is not None else " " * int(spec.split(".")[0])

    lines = [f"{'case':<36} {'impl':<22} {'mode':<5} {'median us':>10} {'IQR':>7} {'x base':>7} {'x peft':>7} "
             f"{'floor us':>9} {'x floor':>7} {'eager-graph us':>14}"]
    for r in rows:
        over = r.extra.get("launch_overhead_us")
        lines.append(f"{r.case:<36} {r.impl:<22} {r.mode:<5} {r.us:10.1f} {r.iqr_us:7.1f} {f(r.x_base)} "
                     f"{f(r.x_peft)} {f(r.floor_us, '9.1f')} {f(r.x_floor)} {f(over, '14.1f')}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import peft

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "peft": peft.__version__, "vera_ext_build": vera_ext.build_info(), "device": device,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "time": time.strftime("%F %T %Z")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_bytes=getattr(p, "L2_cache_size", None))
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run at tiny shapes, no graphs; checks the script, not the speed")
    parser.add_argument("--out", default=os.environ.get("OUT") or "./gpu_out", help="folder for the JSON and log")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default 30 on cuda)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False); "
              "use --device cpu for a dry run of the script's logic", file=sys.stderr)
        return 2
    if args.device == "cuda" and not vera_ext.build_info().get("with_cuda"):
        print(f"gpu_bench: vera_ext was built without CUDA kernels ({vera_ext.build_info()}); rebuild here",
              file=sys.stderr)
        return 2
    s = dict(SHAPES[args.device])
    if args.rounds:
        s["rounds"] = args.rounds
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_bench.log"))
    torch.manual_seed(0)
    started = time.perf_counter()
    report = {"environment": environment(args.device), "shapes": s, "info": {}, "errors": {}}
    log(json.dumps(report["environment"]))

    rows: list[Row] = []
    stacks: dict = {}
    ceil = None
    sections = [("ceilings", lambda: ceilings(args.device, s, log)),
                ("training", lambda: training(args.device, s, ceil, log, report["info"])),
                ("decode", lambda: decode(args.device, s, ceil, log, report["info"], stacks)),
                ("merge", lambda: merge(args.device, s, log, stacks))]
    for name, run in sections:
        t0 = time.perf_counter()
        try:
            result = run()
            if name == "ceilings":
                ceil = report["ceilings"] = result
            else:
                rows += result
            log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
        except Exception as err:
            report["errors"][name] = traceback.format_exc()
            log(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s: {type(err).__name__}: {err}")
            if name == "ceilings":
                break  # every floor needs them
        if args.device == "cuda":
            torch.cuda.empty_cache()

    add_ratios(rows)
    report["rows"] = [asdict(r) | {"x_floor": r.x_floor} for r in rows]
    report["targets"] = targets(rows, s["adapters"])
    if s["graphs"] and stacks:
        report["info"]["graph_probe_mixed_layer_call"] = graph_probe(args.device, s, stacks)
    report["seconds"] = time.perf_counter() - started
    json_path = os.path.join(args.out, "gpu_bench.json")
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)

    log()
    if ceil:
        log(f"{report['environment'].get('gpu', args.device)}: bf16 GEMM {ceil['bf16_gemm_flops_per_s'] / 1e12:.0f} "
            f"TFLOP/s, copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (measured above); decode times are per layer")
    log(table(rows))
    log()
    for t in report["targets"]:
        log(f"TARGET {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f} (want {t['bound']})")
    if "graph_probe_mixed_layer_call" in report["info"]:
        log(f"VeraLinear(x, adapter_names=...) under CUDA-graph capture: "
            f"{report['info']['graph_probe_mixed_layer_call']}")
    for name in report["errors"]:
        log(f"SECTION FAILED: {name} (traceback in {json_path})")
    if args.device == "cpu":
        log("DRY RUN on the CPU at tiny shapes: this checks the script; the numbers mean nothing")
    log(f"gpu_bench: {len(rows)} rows in {report['seconds']:.0f} s; JSON {json_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
