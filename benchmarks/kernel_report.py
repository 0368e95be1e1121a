"""The kernel cost report: what our CUDA kernels would cost on an H200, from facts about our own code, without a GPU.

    python benchmarks/kernel_report.py [--json PATH] [--shapes training|decode|merge|all] [--small]
                                       [--max-blocks N] [--gpu-constants PATH]

Three sources (benchmarks/kernel_cost):
  1. the compiled binary (vera_ext/_C*.so, sm_90 cubins): registers, stack/local memory (spills), shared memory,
     16-byte loads and the loads in flight per warp from the SASS (binary.py), and the occupancy they allow at the
     launch's block size (occupancy.py);
  2. the memory traffic of every launch, traced in the emulated build of the same kernels (traffic.py): requests,
     sectors per request, bytes requested, the distinct bytes read and written;
  3. the H200 model (model.py, constants with their sources in h200.py): a predicted time per launch and per op, next
     to the op's floor (decode: the base weight at HBM rate; training: the GEMM FLOPs at the cuBLAS rate; merge: the
     fp32 GEMM plus one read-modify-write of W) and, for decode, the frozen base layer alone (its bytes plus one
     launch: the "x base" column).

Prints one row per compiled kernel instantiation and one per op case, and writes everything to --json. Takes about
two minutes at the target shapes on 2 cores (--small: reduced shapes, same code paths, for tests).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from kernel_cost import binary, cases, h200, model, traffic  # noqa: E402
from kernel_cost.occupancy import occupancy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    p.add_argument("--shapes", default="all", choices=("training", "decode", "merge", "all"))
    p.add_argument("--small", action="store_true", help="reduced shapes (same code paths): for tests")
    p.add_argument(
        "--dtypes",
        default="bf16,fp16,fp32",
        metavar="LIST",
        help="dtypes to run the cases in (default bf16,fp16,fp32: every kernel instantiation is traced; "
        "bf16 is the target and the only one in the printed op table)",
    )
    p.add_argument(
        "--max-blocks",
        type=int,
        default=64,
        metavar="N",
        help="trace at most N blocks of a launch, scaling its counts up (0: every block; default 64)",
    )
    p.add_argument(
        "--gpu-constants",
        metavar="PATH",
        help="JSON {field: value} replacing model constants of kernel_cost/h200.py (e.g. calibrated)",
    )
    return p.parse_args(argv)


def load_gpu(path):
    if not path:
        return h200.H200
    with open(path, encoding="utf-8") as f:
        return h200.with_overrides(h200.H200, json.load(f))


def kernel_rows(facts, ops_records, gpu):
    """One row per compiled kernel instantiation: its resources, the occupancy at its launch's block size (taken
    from any traced launch of the same kernel family), and its traffic summed over the cases that launched it."""
    launches = {}
    for op in ops_records:
        for ev in op["events"]:
            if ev["kind"] == "kernel":
                launches.setdefault(ev["key"], []).append((op["case"], ev))
    blocks_of = {}
    for key, evs in launches.items():
        blocks_of.setdefault(model.kernel_base(key), evs[0][1]["block"])
    rows = []
    for key, f in sorted(facts.items(), key=lambda kv: (kv[1]["source_file"], kv[0])):
        row = {
            "key": key,
            "source_file": f["source_file"],
            "registers": f["registers"],
            "stack_bytes": f["stack_bytes"],
            "local_bytes": f["local_bytes"],
            "spills": f["spills"],
            "static_shared_bytes": f["static_shared_bytes"],
            "ldg128": f["widths"]["loads"].get(16, 0),
            "bytes_in_flight_per_warp": f["load_batches"]["bytes_in_flight_per_warp"],
        }
        block = blocks_of.get(model.kernel_base(key))
        if block is not None:
            threads = block[0] * block[1] * block[2]
            occ = occupancy(f["registers"], threads, f["static_shared_bytes"], 0, gpu)
            row.update(
                threads_per_block=threads,
                occupancy=occ["occupancy"],
                blocks_per_sm=occ["blocks_per_sm"],
                limited_by=occ["limited_by"],
            )
        evs = [ev for _, ev in launches.get(key, [])]
        if evs:
            req_ld, req_st = _total(evs, "requests", "load"), _total(evs, "requests", "store")
            read, write = _total(evs, "sector_bytes", "read"), _total(evs, "sector_bytes", "write")
            unique = _total(evs, "unique_bytes", "read") + _total(evs, "unique_bytes", "write")
            row["traced"] = {
                "cases": sorted({case for case, _ in launches[key]}),
                "launches": len(evs),
                "sectors_per_request_load": read / 32 / req_ld if req_ld else None,
                "sectors_per_request_store": write / 32 / req_st if req_st else None,
                "requested_over_unique": (read + write) / unique if unique else None,
                "predicted_us": sum(ev["predicted_us"] for ev in evs),
            }
        rows.append(row)
    return rows


def _total(events, field, part):
    return sum(ev[field][part] for ev in events)


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def print_kernels(rows):
    print("Kernels (sm_90 binary; traffic summed over the cases that launch them)")
    head = (
        f"{'kernel':47} {'regs':>4} {'spill':>5} {'smem':>5} {'thr':>4} {'occ':>5} {'limit':>10} {'LDG128':>6} "
        f"{'B/warp':>6} {'sec/req ld':>10} {'st':>5} {'req/uniq':>8} {'us':>8}"
    )
    print(head)
    for r in rows:
        t = r.get("traced", {})
        print(
            f"{r['key'][:47]:47} {r['registers']:>4} {'YES' if r['spills'] else 'no':>5} "
            f"{r['static_shared_bytes']:>5} {r.get('threads_per_block', '-'):>4} "
            f"{fmt(r.get('occupancy') and 100 * r['occupancy'], '.0f') + '%' if 'occupancy' in r else '-':>5} "
            f"{','.join(r.get('limited_by', ['-']))[:10]:>10} {r['ldg128']:>6} "
            f"{r['bytes_in_flight_per_warp']:>6.0f} {fmt(t.get('sectors_per_request_load')):>10} "
            f"{fmt(t.get('sectors_per_request_store')):>5} {fmt(t.get('requested_over_unique'), '.2f'):>8} "
            f"{fmt(t.get('predicted_us')):>8}"
        )


def print_ops(ops_records):
    print(
        "Ops (predicted H200 time against the floor; DRAM bytes against the ideal: each operand read once, each "
        "output written once; events: our kernels K, GEMMs G, other ATen A, host syncs S)"
    )
    print(
        f"{'case':22} {'predicted us':>12} {'floor us':>9} {'x floor':>7} {'x base':>6} {'DRAM MB':>8} "
        f"{'x ideal':>7}  events (us, bound)"
    )
    for op in ops_records:
        evs = ", ".join(
            f"{ev['kind'][0].upper()}:{_event_name(ev)} {ev['predicted_us']:.1f} {ev['bound']}" for ev in op["events"]
        )
        print(
            f"{op['case']:22} {op['predicted_us']:>12.1f} {op['floor_us']:>9.1f} {op['ratio_to_floor']:>7.2f} "
            f"{fmt(op.get('ratio_to_base_layer'), '.2f'):>6} {op['dram_bytes'] / 1e6:>8.1f} "
            f"{op['dram_over_ideal']:>7.2f}  {evs}"
        )
    print(
        "floors: " + "; ".join(sorted({f"{op['group']}: {op['floor_what'].split(' at ')[-1]}" for op in ops_records}))
    )
    print("x base (decode): against the frozen base layer alone, its bytes at the HBM rate plus one launch")


def _event_name(ev):
    if ev["kind"] == "kernel":
        return model.kernel_base(ev["key"]).replace("_kernel", "")
    if ev["kind"] == "gemm":
        return f"{ev['op'].split('.')[1]}({ev['m']}x{ev['k']}x{ev['n']})"
    return ev["op"].split(".")[1]


def git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    gpu = load_gpu(args.gpu_constants)
    t0 = time.time()
    facts = binary.kernel_facts()
    emu = traffic.load_emulator()
    selected = cases.select(args.shapes, args.small, args.dtypes.split(","))
    ops_records = []
    for i, case in enumerate(selected):
        print(f"[{i + 1}/{len(selected)}] tracing {case.name} ({case.what})", file=sys.stderr, flush=True)
        events = traffic.trace_case(emu, case, args.max_blocks)
        ops_records.append(model.predict_case(case, events, facts, gpu))
    rows = kernel_rows(facts, ops_records, gpu)
    sampled = sorted(
        {
            ev["key"]
            for op in ops_records
            for ev in op["events"]
            if ev["kind"] == "kernel" and ev["executed_blocks"] < ev["blocks"]
        }
    )

    print_kernels(rows)
    print()
    print_ops([op for op in ops_records if op["dims"]["dtype"] == "bfloat16"] or ops_records)
    print()
    print(
        f"Traced at the {'reduced' if args.small else 'target'} shapes; launches of more than {args.max_blocks} "
        f"blocks ran {args.max_blocks} of them (8 evenly spaced runs) and their counts are scaled by blocks / "
        f"traced blocks ({len(sampled)} kernels: {', '.join(sampled) or 'none'})."
    )
    target = [op for op in ops_records if op["dims"]["dtype"] == "bfloat16"] or ops_records
    for what, order in (
        ("in microseconds", lambda op: op["floor_us"] - op["predicted_us"]),
        ("as a ratio", lambda op: -op["ratio_to_floor"]),
    ):
        print(
            f"Biggest gaps to the floor {what}: "
            + "; ".join(
                f"{op['case']} {op['predicted_us']:.0f} us vs {op['floor_us']:.1f} us ({op['ratio_to_floor']:.2f}x)"
                for op in sorted(target, key=order)[:3]
            )
        )
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)

    if args.json:
        report = {
            "schema": 1,
            "commit": git_commit(),
            "shapes": args.shapes,
            "small": args.small,
            "max_blocks": args.max_blocks,
            "gpu": h200.to_json(gpu),
            "model": model.__doc__.strip(),
            "kernels": rows,
            "ops": ops_records,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
