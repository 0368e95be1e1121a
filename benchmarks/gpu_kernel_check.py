"""Predicted vs measured: the kernel cost report's figures for each op case next to what the GPU measures.

    python benchmarks/gpu_kernel_check.py --report $OUT/kernel_report.json        # on the GPU (ncu if it can)
    python benchmarks/gpu_kernel_check.py --report r.json --device cpu            # dry run of the plumbing, no GPU

Writes $OUT/kernel_check.json and appends two tables to $OUT/kernel_check.log ($OUT defaults to ./gpu_out): one row
per op case (predicted, measured, floor) and one row per launch of our kernels (registers, DRAM bytes, sectors per
request, time, warps active: predicted vs measured). The cases are kernel_cost.cases' (`--shapes`, `--dtypes`), the
same calls the report predicts.

Measuring, in this order:
 1. Op time, always: per case, CUDA events around the whole op call, median and IQR of `--rounds` calls after 3
    warm-up calls, L2 flushed (a 256 MiB write) before each call, as ncu's default --cache-control all does before
    each kernel. One more call under torch.profiler gives each kernel's duration (used when ncu has no counters).
 2. Counters, with `--mode ncu|auto`: this script runs itself as a child under Nsight Compute (see `ncu_command`),
    which profiles one call per case: registers, DRAM bytes read and written, global load/store sectors and
    requests, warps active, duration. `--mode auto` falls back to step 1's profiler durations when ncu is missing,
    cannot read the counters (ERR_NVGPUCTRPERM, "not supported"), fails, or prints no metric rows; the reason is
    logged and recorded as "ncu": "unavailable: <reason>".
Our kernels (namespace vera::cuda, or a key the report knows) are matched to the report's kernel events by case and
by order of occurrence of the same key; every other kernel (cuBLAS, ATen) is summed into the op's kernel total and
listed by name. Exit status: 0 when it ran (however far off the predictions are), 1 when something raised or a
requested part (the report, `--mode ncu`) was unavailable, 2 without a GPU (unless --device cpu).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cost.binary import kernel_key  # noqa: E402
from vera_ext.bench.cli import positive_int  # noqa: E402
from vera_ext.bench.timing import median_iqr  # noqa: E402
from kernel_cost.cases import DTYPES, GROUPS, select  # noqa: E402
from kernel_cost.h200 import H200  # noqa: E402

# The counters per launch, in ncu's metric names.
METRICS = (
    "launch__registers_per_thread",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "gpu__time_duration.sum",
)
OURS_NAMESPACE = "vera::cuda::"
NVTX_PREFIX = "vkc-"  # a case's NVTX range: nvtx_range_name(); no ':' (ncu separates the range's fields by it)
MARKER_KEY = "spin_kernel"  # torch.cuda._sleep's kernel, launched first in each profiled case (see assign_cases)
FLUSH_BYTES = 256 << 20  # over 4x the H200's 60 MB L2
WARMUP = 3

# ncu unit -> factor to this script's units: bytes, microseconds, and counts as counts. ncu's prefixes are decimal.
_PREFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
_COUNTS = ("byte", "sector", "request", "inst", "cycle", "warp")
_PLAIN_UNITS = ("", "%", "register/thread", "thread", "block")


# ---------------------------------------------------------------------------------------------------------------
# Reading ncu's output (pure functions)


def _unit_factor(unit: str, column: str) -> float:
    """The factor from a value printed in `unit` to bytes / microseconds / counts; ValueError for a unit this
    script does not know (a wrong factor would be silently off by 1000x)."""
    unit = unit.strip()
    if unit in _PLAIN_UNITS:
        return 1.0
    if unit in _TIME_US:
        return _TIME_US[unit]
    for base in _COUNTS:
        if unit.endswith(base) and unit[: -len(base)] in _PREFIX:
            return _PREFIX[unit[: -len(base)]]
    raise ValueError(
        f"unknown unit {unit!r} for ncu column {column!r}; expected one of byte/Kbyte/Mbyte/Gbyte, "
        f"nsecond/usecond/msecond/second, sector, request, %, register/thread"
    )


def _number(cell: str) -> Optional[float]:
    """A metric cell as a float ("1,234.5" -> 1234.5); None for an empty or "n/a" cell."""
    text = cell.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(text: str) -> List[List[str]]:
    """The CSV rows of an ncu raw page, from its header row (the first with a "Kernel Name" cell) on; ncu's own
    message lines ("==PROF==", "==WARNING==") and any line with another number of cells than the header are
    skipped."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("==")]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    start = next((i for i, row in enumerate(rows) if "Kernel Name" in row), None)
    if start is None:
        return []
    return [row for row in rows[start:] if len(row) == len(rows[start])]


def nvtx_range_name(case_name: str) -> str:
    """The NVTX range the child pushes around a case: "vkc-" + the case's name with '@' (ncu's domain@range
    separator in NVTX filters) spelled '.', e.g. "vkc-train_fwd.fp16" for case train_fwd@fp16."""
    return NVTX_PREFIX + case_name.replace("@", ".")


def _case_in_nvtx(cells: str) -> Optional[str]:
    """The case named by the innermost "vkc-..." range in the NVTX cells of a launch, or None."""
    found = re.findall(re.escape(NVTX_PREFIX) + r"([\w.]+)", cells)
    return found[-1].replace(".", "@") if found else None


def launch_key(name: str) -> str:
    """The key of a launch's kernel: kernel_key of a demangled signature ("void ns::k<float>(P)" -> "k<float>");
    a name without a parameter list (cuBLAS's extern "C" kernels, profiler op names) or a memcpy/memset activity
    is its own key."""
    if "(" not in name or name.startswith(("Memcpy", "Memset")):
        return name
    try:
        return kernel_key(name)
    except ValueError:
        return name


def parse_ncu_csv(text: str) -> List[dict]:
    """One dict per profiled launch of `ncu --csv --page raw` output, in launch order:
      id      ncu's launch ID (its "ID" column; the row's index without one)
      name    the kernel's name as printed (demangled with --print-kernel-base demangled)
      key     launch_key(name), e.g. "decode_y_kernel<__nv_bfloat16>"
      case    the case named by the launch's NVTX push/pop range (nvtx_range_name; a column that --nvtx adds,
              whose header starts "thread Domain:Push/Pop_Range"); None without one
      grid, block   as printed, e.g. "(256, 1, 1)"; None without those columns
      metrics {ncu metric name: float or None (n/a)} for the metric columns (names with "__", as ncu's metrics
              have); bytes in bytes, times in microseconds, percentages and counts as printed.
    The units row that follows the header (its Kernel Name cell empty) gives each column's unit ("Mbyte",
    "nsecond", ...). A metric this script did not ask for (not in METRICS) in a unit it does not know is left out;
    one of METRICS in such a unit raises ValueError, as no number could be trusted. Returns [] when there is no
    header row.
    """
    rows = _csv_rows(text)
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    units = body.pop(0) if body and body[0][col["Kernel Name"]] == "" else [""] * len(header)
    nvtx = [i for i, name in enumerate(header) if "Push/Pop_Range" in name]
    factors = {}
    for i, name in enumerate(header):
        if "__" in name:
            try:
                factors[i] = _unit_factor(units[i], name)
            except ValueError:
                if name in METRICS:
                    raise
    launches = []
    for index, row in enumerate(body):
        metrics = {}
        for i, factor in factors.items():
            value = _number(row[i])
            metrics[header[i]] = None if value is None else value * factor
        name = row[col["Kernel Name"]]
        launches.append(
            {
                "id": int(_number(row[col["ID"]]) or 0) if "ID" in col else index,
                "name": name,
                "key": launch_key(name),
                "case": _case_in_nvtx(" ".join(row[i] for i in nvtx)),
                "grid": row[col["Grid Size"]] if "Grid Size" in col else None,
                "block": row[col["Block Size"]] if "Block Size" in col else None,
                "metrics": metrics,
            }
        )
    return launches


def assign_cases(launches: List[dict], marked_cases: List[str]) -> List[dict]:
    """The profiled launches with their case, marker launches removed.

    Each profiled case starts with one marker launch (MARKER_KEY); `marked_cases` are the cases whose marker was
    launched, in order. When every other launch carries its case from the NVTX column, that is kept; otherwise
    (a ncu whose raw page has no NVTX column, or another spelling of it) the launches between the k-th and the
    (k+1)-th marker belong to marked_cases[k]. Raises ValueError when the markers do not line up with
    `marked_cases`, since every case would then be misattributed.
    """
    kernels = [launch for launch in launches if launch["key"] != MARKER_KEY]
    if all(launch["case"] for launch in kernels):
        return kernels
    markers = sum(launch["key"] == MARKER_KEY for launch in launches)
    if markers != len(marked_cases):
        raise ValueError(
            f"ncu profiled {markers} case markers ({MARKER_KEY}) but the child marked "
            f"{len(marked_cases)} cases; cannot tell which launch belongs to which case"
        )
    out, index = [], -1
    for launch in launches:
        if launch["key"] == MARKER_KEY:
            index += 1
        elif index < 0:
            raise ValueError(f"launch {launch['id']} ({launch['key']}) came before the first case marker")
        else:
            out.append({**launch, "case": marked_cases[index]})
    return out


def ncu_problem(returncode: Optional[int], output: str, launches: List[dict]) -> Optional[str]:
    """Why ncu's counters cannot be used, or None when they can.

    `output` is everything ncu printed (its log file and the process's stdout and stderr); `launches` what
    parse_ncu_csv read from it. Counters are unusable when ncu lacks permission to read them (ERR_NVGPUCTRPERM, on
    any run), or when no launch has a metric value: then the reason is ncu's "not supported" line, its first
    ==ERROR== line, its exit status, or the absence of metric rows, whichever is found first. A non-zero exit with
    metric values present (e.g. the child failed in a late case) still leaves the counters usable.
    """
    if "ERR_NVGPUCTRPERM" in output:
        return "no permission to read the GPU's performance counters (ERR_NVGPUCTRPERM)"
    if any(value is not None for launch in launches for value in launch["metrics"].values()):
        return None
    lines = [line.strip() for line in output.splitlines()]
    unsupported = next((line for line in lines if "not supported" in line.lower()), None)
    if unsupported:
        return unsupported
    error = next((line for line in lines if line.startswith("==ERROR==")), None)
    if error:
        return error
    if returncode:
        return f"ncu exited with status {returncode}"
    if launches:
        return f"ncu printed {len(launches)} launches but no metric values (all n/a)"
    warning = next((line for line in lines if line.startswith("==WARNING==")), "")
    return f"no metric rows in ncu's output {warning}".strip()


# ---------------------------------------------------------------------------------------------------------------
# Running ncu


def find_ncu() -> Optional[str]:
    """The first executable of $NCU, `ncu` on PATH, $CUDA_HOME/bin/ncu and /usr/local/cuda/bin/ncu; None when
    there is none."""
    candidates = [
        os.environ.get("NCU"),
        shutil.which("ncu"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ncu"),
        "/usr/local/cuda/bin/ncu",
    ]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def ncu_command(ncu: str, log_path: str, child_argv: List[str]) -> List[str]:
    """The ncu command line that profiles the child.

    How cases are isolated: --profile-from-start off profiles only between cudaProfilerStart and cudaProfilerStop,
    which the child calls around the one profiled call of each case (its warm-up call runs outside, so lazy module
    loading and cuBLAS's first-call setup are not measured). This is plain CUDA API that every ncu honours, where
    --nvtx-include's filter syntax has changed between releases. --nvtx still records the case's NVTX range on each
    launch (the raw page's "thread Domain:Push/Pop_Range..." column) to tell the cases apart; the marker kernel
    the child launches first in each case tells them apart when that column is missing (assign_cases).
    --clock-control none measures at the clocks a real run gets (ncu's default locks the base clock, about 20%
    slower than boost); --cache-control all (the default) flushes the caches before each kernel, so DRAM bytes are
    a cold kernel's. Kernel replay (the default) replays each kernel once per metric pass with its memory restored.
    --print-units base prints bytes and nanoseconds unscaled; --print-kernel-base demangled keeps namespaces and
    template arguments (the default prints the bare function name). --log-file keeps the CSV apart from the
    child's output.
    """
    return [
        ncu,
        "--metrics",
        ",".join(METRICS),
        "--csv",
        "--page",
        "raw",
        "--print-units",
        "base",
        "--print-kernel-base",
        "demangled",
        "--profile-from-start",
        "off",
        "--nvtx",
        "--clock-control",
        "none",
        "--cache-control",
        "all",
        "--log-file",
        log_path,
        *child_argv,
    ]


def run_ncu(ncu: str, shapes: str, dtypes: str, timeout_s: float) -> dict:
    """Profile every case of `shapes` in `dtypes` (comma-separated) under ncu, in a child process. Returns
    {"status": "ok: ..." or "unavailable: <reason>", "launches": parse_ncu_csv rows with their case (assign_cases),
    "raw": everything ncu printed, "case_errors": {case: error} from the child}. A run killed at `timeout_s` keeps
    what ncu had written by then (ncu may print its results only when the child exits)."""
    work = tempfile.mkdtemp(prefix="gpu_kernel_check_")
    try:
        log_path, manifest_path = os.path.join(work, "ncu.csv"), os.path.join(work, "manifest.json")
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "--shapes",
            shapes,
            "--dtypes",
            dtypes,
            "--manifest",
            manifest_path,
        ]
        returncode, output = _run_group(ncu_command(ncu, log_path, child), timeout_s)
        text = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
        raw = text + ("\n" + output if output.strip() else "")
        manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {"cases": []}
        result = {
            "launches": [],
            "raw": raw,
            "case_errors": {c["case"]: c["error"] for c in manifest["cases"] if c["error"]},
        }
        note = (
            f"; killed after {timeout_s:.0f} s, partial"
            if returncode is None
            else f"; ncu exited with status {returncode}"
            if returncode
            else ""
        )
        try:
            launches = parse_ncu_csv(text)
            problem = ncu_problem(returncode, raw, launches)
            if not problem:
                launches = assign_cases(launches, [c["case"] for c in manifest["cases"] if c["marked"]])
        except ValueError as err:
            problem = f"cannot read ncu's output: {err}"
        if problem:
            return {**result, "status": f"unavailable: {problem}{note}"}
        return {**result, "launches": launches, "status": f"ok: {len(launches)} launches profiled{note}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_group(cmd: List[str], timeout_s: float):
    """(exit status, stdout + stderr) of `cmd` run in its own process group; (None, output so far) when it ran
    past `timeout_s`, after killing that group (ncu and the child it started, nothing else)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _nvtx_push(name: str) -> bool:
    """Push the NVTX range `name`; False when this torch build has no NVTX (the markers still tell cases apart)."""
    try:
        torch.cuda.nvtx.range_push(name)
        return True
    except (RuntimeError, AttributeError):
        return False


def child_main(cases, manifest_path: str) -> int:
    """The profiled child: per case, a warm-up call, then inside cudaProfilerStart/Stop and the case's NVTX range
    (nvtx_range_name) the marker kernel and one call. After each case it rewrites {"cases": [{"case", "marked",
    "error"}]} to `manifest_path` ("marked": its marker was launched, so ncu saw the case start), so a run killed
    part way still says which cases it reached."""
    import vera_ext  # noqa: F401  (registers torch.ops.vera_ext)

    ops, record = torch.ops.vera_ext, []
    for case in cases:
        entry = {"case": case.name, "marked": False, "error": None}
        try:
            inputs = case.make_inputs("cuda")
            case.run(ops, inputs)
            torch.cuda.synchronize()
            pushed = _nvtx_push(nvtx_range_name(case.name))
            torch.cuda.profiler.start()
            try:
                torch.cuda._sleep(1)
                entry["marked"] = True
                case.run(ops, inputs)
                torch.cuda.synchronize()
            finally:
                torch.cuda.profiler.stop()
                if pushed:
                    torch.cuda.nvtx.range_pop()
            del inputs
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"
            print(f"gpu_kernel_check child: {case.name}: {entry['error']}", file=sys.stderr)
        record.append(entry)
        torch.cuda.empty_cache()
        with open(manifest_path, "w") as fh:
            json.dump({"cases": record}, fh)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Timing and torch.profiler


def time_op(case, ops, inputs, device: str, rounds: int, flush) -> tuple:
    """(median us, IQR us) of one call of the case's op over `rounds` calls after WARMUP calls. On CUDA each call
    is timed by CUDA events and preceded, outside the timed span, by `flush.zero_()` (L2 evicted; while the GPU
    flushes, the host queues the call's launches, so the span is the GPU's time without host launch overhead); on
    the CPU by time.perf_counter."""
    for _ in range(WARMUP):
        case.run(ops, inputs)
    if device == "cpu":
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            case.run(ops, inputs)
            times.append((time.perf_counter() - t0) * 1e6)
        return median_iqr(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        case.run(ops, inputs)
        end.record()
    torch.cuda.synchronize()
    return median_iqr([start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends)])


def profiler_launches(case, ops, inputs, device: str, flush) -> List[dict]:
    """One call of the case's op under torch.profiler, as launches in the form of parse_ncu_csv's (metrics: only
    gpu__time_duration.sum, in us). On CUDA the launches are the device activities (kernels, memcpy, memset) in
    start order; on the CPU (dry run) the ATen calls the op makes (the top-level call's children)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        flush.zero_()
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        case.run(ops, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        picked = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        picked = [child for e in events if e.cpu_parent is None for child in e.cpu_children]
    picked.sort(key=lambda e: e.time_range.start)
    return [
        {
            "id": i,
            "name": e.name,
            "key": launch_key(e.name),
            "case": case.name,
            "grid": None,
            "block": None,
            "metrics": {"gpu__time_duration.sum": e.time_range.elapsed_us()},
        }
        for i, e in enumerate(picked)
    ]


def measure_cases(cases, device: str, rounds: int, log) -> dict:
    """Step 1 for every case: {"timings": {case: (median us, IQR us)}, "launches": profiler_launches of all cases,
    "errors": {case: traceback}}."""
    import vera_ext  # noqa: F401  (registers torch.ops.vera_ext)

    ops = torch.ops.vera_ext
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device == "cuda" else None
    out = {"timings": {}, "launches": [], "errors": {}}
    for case in cases:
        try:
            inputs = case.make_inputs(device)
            out["timings"][case.name] = time_op(case, ops, inputs, device, rounds, flush)
            out["launches"] += profiler_launches(case, ops, inputs, device, flush)
            median, iqr = out["timings"][case.name]
            log(f"[time] {case.name:<20} {median:10.1f} us  (IQR {iqr:.1f})")
            del inputs
        except Exception as err:
            out["errors"][case.name] = traceback.format_exc()
            log(f"[time] {case.name:<20} FAILED: {type(err).__name__}: {err}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report and the comparison


def load_report(path: str) -> dict:
    """The kernel_report JSON at `path`; ValueError naming the field when it is not schema 1 with "ops" (each with
    "case" and "events") and "kernels" (each with "key")."""
    with open(path) as fh:
        report = json.load(fh)
    if not isinstance(report, dict) or report.get("schema") != 1:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ValueError(f'--report {path}: expected a kernel_report JSON object with "schema": 1, got {found!r}')
    for field, inner in (("ops", ("case", "events")), ("kernels", ("key",))):
        items = report.get(field)
        if not isinstance(items, list) or not all(isinstance(i, dict) and all(k in i for k in inner) for i in items):
            raise ValueError(f'--report {path}: expected "{field}" to be a list of objects with {", ".join(inner)}')
    return report


def _ratio(a, b) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def _sum(values) -> Optional[float]:
    """The sum of the values that are not None; None when all are."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def measured_kernel(launch: dict) -> dict:
    """The measured side of a kernel row, from a launch of parse_ncu_csv or profiler_launches (absent metrics are
    None): time_us, registers, dram_read_bytes, dram_write_bytes, dram_bytes, ld/st_sectors_per_request,
    warps_active_pct, dram_pct_of_peak, grid, block, name."""
    m = launch["metrics"]
    read, write = m.get("dram__bytes_read.sum"), m.get("dram__bytes_write.sum")
    return {
        "name": launch["name"],
        "grid": launch["grid"],
        "block": launch["block"],
        "time_us": m.get("gpu__time_duration.sum"),
        "registers": m.get("launch__registers_per_thread"),
        "dram_read_bytes": read,
        "dram_write_bytes": write,
        "dram_bytes": _sum([read, write]),
        "ld_sectors_per_request": _ratio(
            m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"),
            m.get("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"),
        ),
        "st_sectors_per_request": _ratio(
            m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum"),
            m.get("l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"),
        ),
        "warps_active_pct": m.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
        "dram_pct_of_peak": m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    }


def predicted_kernel(event: dict, kernel: Optional[dict], max_warps: int) -> dict:
    """The predicted side of a kernel row, from the report's kernel event (registers and occupancy as the model
    used them) and its entry in "kernels" (registers when the event lacks them). warps_active_pct: the resident
    warps per SM the model assumed (occupancy capped by the grid) over `max_warps`, else the theoretical
    occupancy; the achieved warps active can at best reach it."""
    kernel = kernel or {}
    spr = event.get("sectors_per_request") or {}
    if event.get("resident_warps_per_sm") is not None:
        warps = event["resident_warps_per_sm"] / max_warps * 100
    else:
        occupancy = event.get("occupancy", kernel.get("occupancy"))
        warps = None if occupancy is None else occupancy * 100
    return {
        # ncu replays each kernel alone: a programmatic dependent's own time, not what it adds next to the kernel
        # before it (model.price_dependent_launches)
        "time_us": event.get("alone_us", event.get("predicted_us")),
        "registers": event.get("registers", kernel.get("registers")),
        "dram_bytes": event.get("dram_bytes"),
        "ld_sectors_per_request": spr.get("load"),
        "st_sectors_per_request": spr.get("store"),
        "grid": event.get("grid"),
        "block": event.get("block"),
        "warps_active_pct": warps,
    }


def match_kernels(case: str, events: List[dict], ours: List[dict], kernels: dict, max_warps: int) -> List[dict]:
    """Kernel rows of one case: the report's kernel events in order, each paired with the measured launch of the
    same key and the same occurrence (the 2nd decode_u_kernel<...> predicted with the 2nd measured), then the
    measured launches the report did not predict. Each row: case, key, occurrence, status ("matched", "not
    launched", "not predicted"), predicted, measured (None on the side that is missing)."""
    measured, seen = {}, collections.Counter()
    for launch in ours:
        measured[(launch["key"], seen[launch["key"]])] = launch
        seen[launch["key"]] += 1
    rows, used, seen = [], set(), collections.Counter()
    for event in (e for e in events if e.get("kind") == "kernel"):
        slot = (event["key"], seen[event["key"]])
        seen[event["key"]] += 1
        launch = measured.get(slot)
        used.add(slot)
        rows.append(
            {
                "case": case,
                "key": slot[0],
                "occurrence": slot[1],
                "status": "matched" if launch else "not launched",
                "predicted": predicted_kernel(event, kernels.get(slot[0]), max_warps),
                "measured": measured_kernel(launch) if launch else None,
            }
        )
    for slot, launch in measured.items():
        if slot not in used:
            rows.append(
                {
                    "case": case,
                    "key": slot[0],
                    "occurrence": slot[1],
                    "status": "not predicted",
                    "predicted": None,
                    "measured": measured_kernel(launch),
                }
            )
    return rows


def op_row(case, op: Optional[dict], timing, launches: List[dict], ours_keys: set) -> dict:
    """One op case: the report's prediction and floor, the measured time (CUDA events, median and IQR), their
    ratios, the report's predicted DRAM bytes over the measured time (effective bandwidth), and the launches'
    totals: all kernels, ours, the others (listed by key with count and time), DRAM bytes when ncu measured them."""
    op = op or {}
    median, iqr = timing if timing else (None, None)
    events = op.get("events", [])
    pred_dram = _sum([e.get("dram_bytes") for e in events])
    others = collections.OrderedDict()
    for launch in launches:
        if launch["key"] not in ours_keys:
            entry = others.setdefault(launch["key"], {"name": launch["key"], "count": 0, "time_us": 0.0})
            entry["count"] += 1
            entry["time_us"] += launch["metrics"].get("gpu__time_duration.sum") or 0.0
    times = [launch["metrics"].get("gpu__time_duration.sum") for launch in launches]
    dram = [
        _sum([launch["metrics"].get("dram__bytes_read.sum"), launch["metrics"].get("dram__bytes_write.sum")])
        for launch in launches
    ]
    return {
        "case": case.name,
        "group": case.group,
        "what": case.what,
        "dims": case.dims(),
        "predicted_us": op.get("predicted_us"),
        "measured_us": median,
        "measured_iqr_us": iqr,
        "ratio_measured_to_predicted": _ratio(median, op.get("predicted_us")),
        "floor_us": op.get("floor_us"),
        "floor_what": op.get("floor_what"),
        "ratio_measured_to_floor": _ratio(median, op.get("floor_us")),
        "predicted_dram_bytes": pred_dram,
        "effective_bytes_per_s": _ratio(pred_dram, median * 1e-6 if median else None),
        "measured_dram_bytes": _sum(dram),
        "kernel_sum_us": _sum(times),
        "predicted_ours_us": _sum([e.get("predicted_us") for e in events if e.get("kind") == "kernel"]),
        "measured_ours_us": _sum([t for t, l in zip(times, launches) if l["key"] in ours_keys]),
        "predicted_other_us": _sum([e.get("predicted_us") for e in events if e.get("kind") != "kernel"]),
        "measured_other_us": _sum([o["time_us"] for o in others.values()]),
        "other_kernels": list(others.values()),
    }


def compare(cases, report: Optional[dict], timings: dict, launches: List[dict]) -> dict:
    """{"ops": op_row per case, "kernels": match_kernels rows of all cases} for the cases measured; our kernels
    are those in namespace vera::cuda or with a key the report's "kernels" lists."""
    ops = {op["case"]: op for op in (report or {}).get("ops", [])}
    kernels = {k["key"]: k for k in (report or {}).get("kernels", [])}
    # the model's figure when the report lists it (h200.to_json: {field: {"value", "source"}})
    max_warps = ((report or {}).get("gpu") or {}).get("max_warps_per_sm", {}).get("value", H200.max_warps_per_sm)
    ours_keys = set(kernels) | {launch["key"] for launch in launches if OURS_NAMESPACE in launch["name"]}
    result = {"ops": [], "kernels": []}
    for case in cases:
        mine = [launch for launch in launches if launch["case"] == case.name]
        result["ops"].append(op_row(case, ops.get(case.name), timings.get(case.name), mine, ours_keys))
        result["kernels"] += match_kernels(
            case.name,
            ops.get(case.name, {}).get("events", []),
            [launch for launch in mine if launch["key"] in ours_keys],
            kernels,
            max_warps,
        )
    return result


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _f(value, spec: str = ".1f", scale: float = 1.0) -> str:
    """`value` / `scale` formatted, or "-" when missing."""
    return "-" if value is None else format(value / scale, spec)


def _pair(pred, meas, spec: str = ".1f", scale: float = 1.0) -> str:
    """ "predicted/measured" in one cell."""
    return f"{_f(pred, spec, scale)}/{_f(meas, spec, scale)}"


def ops_table(rows: List[dict]) -> str:
    """One line per op case: predicted and measured us, measured/predicted, floor and measured/floor, the
    report's DRAM bytes and that over the measured time, ncu's DRAM bytes, the launches' kernel time."""
    head = (
        f"{'case':<20} {'pred us':>9} {'meas us':>9} {'m/p':>6} {'floor us':>9} {'m/floor':>7} "
        f"{'pred MB':>8} {'eff TB/s':>8} {'meas MB':>8} {'kern us':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<20} {_f(r['predicted_us']):>9} {_f(r['measured_us']):>9} "
            f"{_f(r['ratio_measured_to_predicted'], '.2f'):>6} {_f(r['floor_us']):>9} "
            f"{_f(r['ratio_measured_to_floor'], '.2f'):>7} {_f(r['predicted_dram_bytes'], '.1f', 1e6):>8} "
            f"{_f(r['effective_bytes_per_s'], '.2f', 1e12):>8} "
            f"{_f(r['measured_dram_bytes'], '.1f', 1e6):>8} {_f(r['kernel_sum_us']):>9}"
        )
    return "\n".join(lines)


def kernels_table(rows: List[dict]) -> str:
    """One line per launch of our kernels, each cell "predicted/measured": registers, DRAM MB, load and store
    sectors per request, time us, warps active %; then the time ratio and the match status."""
    head = (
        f"{'case':<20} {'kernel':<46} {'regs':>9} {'DRAM MB':>13} {'ld sec/req':>11} {'st sec/req':>11} "
        f"{'us':>15} {'m/p':>6} {'warps %':>11}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["predicted"] or {}, r["measured"] or {}
        key = r["key"] + (f" #{r['occurrence'] + 1}" if r["occurrence"] else "")
        lines.append(
            f"{r['case']:<20} {key[:46]:<46} {_pair(p.get('registers'), m.get('registers'), '.0f'):>9} "
            f"{_pair(p.get('dram_bytes'), m.get('dram_bytes'), '.2f', 1e6):>13} "
            f"{_pair(p.get('ld_sectors_per_request'), m.get('ld_sectors_per_request')):>11} "
            f"{_pair(p.get('st_sectors_per_request'), m.get('st_sectors_per_request')):>11} "
            f"{_pair(p.get('time_us'), m.get('time_us')):>15} "
            f"{_f(_ratio(m.get('time_us'), p.get('time_us')), '.2f'):>6} "
            f"{_pair(p.get('warps_active_pct'), m.get('warps_active_pct'), '.0f'):>11}  {r['status']}"
        )
    return "\n".join(lines)


def _spread(ratios: List[Optional[float]]) -> str:
    """ "median M (min a, max b) over n" of the ratios present, or "none"."""
    present = sorted(r for r in ratios if r is not None)
    if not present:
        return "none"
    return f"median {statistics.median(present):.2f} (min {present[0]:.2f}, max {present[-1]:.2f}) over {len(present)}"


def summary_lines(result: dict) -> List[str]:
    """The KERNEL_CHECK lines gpu_check.sh copies into summary.txt: where the kernel figures came from, and the
    spread of measured/predicted ratios for ops and kernels."""
    ops, kernels = result["ops"], result["kernels"]
    status = collections.Counter(r["status"] for r in kernels)
    matched = [r for r in kernels if r["status"] == "matched"]
    return [
        f"KERNEL_CHECK source: {result['launch_source']}; ncu: {result['ncu']}",
        f"KERNEL_CHECK ops measured/predicted: {_spread([r['ratio_measured_to_predicted'] for r in ops])}; "
        f"measured/floor: {_spread([r['ratio_measured_to_floor'] for r in ops])}",
        f"KERNEL_CHECK kernels: {status['matched']} matched, {status['not launched']} not launched, "
        f"{status['not predicted']} not predicted; time m/p "
        f"{_spread([_ratio(r['measured']['time_us'], r['predicted']['time_us']) for r in matched])}; DRAM bytes m/p "
        f"{_spread([_ratio(r['measured']['dram_bytes'], r['predicted']['dram_bytes']) for r in matched])}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Main


class Log:
    """Appends each message to the log file (appended: gpu_check.sh's report step writes there first) and, unless
    echo is False, prints it."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def __call__(self, msg: str = "", echo: bool = True) -> None:
        if echo:
            print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def environment(device: str, ncu: Optional[str]) -> dict:
    """Versions, the GPU and the ncu used, for the JSON."""
    import vera_ext

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "vera_ext_build": vera_ext.build_info(),
        "device": device,
        "time": time.strftime("%F %T %Z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", None))
    if ncu:
        try:
            version = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=30).stdout
            env["ncu"] = {"path": ncu, "version": version.strip().splitlines()[-1] if version.strip() else None}
        except (OSError, subprocess.TimeoutExpired) as err:
            env["ncu"] = {"path": ncu, "version": f"'ncu --version' failed: {err}"}
    return env


def _dtypes(text: str) -> List[str]:
    """argparse type: a comma-separated list of kernel_cost.cases' dtypes."""
    names = [d for d in text.split(",") if d]
    if not names or any(d not in DTYPES for d in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list among {', '.join(DTYPES)}, got {text!r}")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report",
        help="the kernel_report JSON to compare with (default $OUT/kernel_report.json); "
        "without one the measurements are still made and written",
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or "./gpu_out", help="folder for the JSON and log")
    parser.add_argument("--shapes", default="all", choices=GROUPS + ("all",), help="which cases (default all)")
    parser.add_argument(
        "--dtypes",
        default="bf16",
        type=_dtypes,
        help="comma-separated dtypes of the cases, among bf16, fp16, fp32 (default bf16: the target; "
        "the report names the others' cases case@fp16, case@fp32)",
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: dry run of the plumbing at the small case sizes with the CPU ops; no ncu, no "
        "CUDA events; numbers mean nothing",
    )
    parser.add_argument(
        "--mode",
        choices=["ncu", "events", "auto"],
        default="auto",
        help="ncu: counters from Nsight Compute (exit 1 if unavailable); events: CUDA events and "
        "torch.profiler only; auto (default): ncu, else events",
    )
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed calls per case (default 20)")
    parser.add_argument(
        "--ncu-timeout",
        type=positive_int,
        default=120,
        help="seconds the ncu run may take before it is killed (default 120)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the process ncu profiles
    parser.add_argument("--manifest", help=argparse.SUPPRESS)  # where the child records its cases
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.mode == "ncu":
        parser.error("--mode ncu needs --device cuda (the CPU dry run has no counters to read)")
    if args.child and not args.manifest:
        parser.error("--child needs --manifest PATH")
    args.report = args.report or os.path.join(args.out, "kernel_report.json")
    return args


def ncu_phase(args, ncu: Optional[str], cases, log) -> dict:
    """Step 2: {"status", "launches" (None unless ncu's counters are usable), "raw", "case_errors"}; ncu is run
    only on CUDA with --mode ncu|auto and when it was found."""
    if args.device == "cpu" or args.mode == "events":
        return {
            "status": f"not run (--device {args.device}, --mode {args.mode})",
            "launches": None,
            "raw": None,
            "case_errors": {},
        }
    if ncu is None:
        return {
            "status": "unavailable: ncu not found ($NCU, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)",
            "launches": None,
            "raw": None,
            "case_errors": {},
        }
    torch.cuda.empty_cache()  # the child needs the memory this process cached in step 1
    log(f"[ncu] profiling {len(cases)} cases under {ncu} (limit {args.ncu_timeout} s)")
    t0 = time.perf_counter()
    ran = run_ncu(ncu, args.shapes, ",".join(args.dtypes), args.ncu_timeout)
    log(f"[ncu] {ran['status']} ({time.perf_counter() - t0:.0f} s)")
    return {**ran, "launches": ran["launches"] or None}


def log_tables(log, doc: dict, raw: Optional[str]) -> None:
    """The two tables, the KERNEL_CHECK lines, then ncu's raw output (evidence for the numbers; to the file only,
    as it is long) when it ran."""
    log()
    log(
        f"==== predicted vs measured ({doc['environment'].get('gpu', doc['environment']['device'])}, kernels from "
        f"{doc['launch_source']}; cells: predicted/measured)"
    )
    log(ops_table(doc["ops"]))
    log()
    log(kernels_table(doc["kernels"]))
    log()
    for line in summary_lines(doc):
        log(line)
    if raw:
        log("\n---- ncu output\n" + raw.rstrip(), echo=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(select(args.shapes, dtypes=args.dtypes), args.manifest)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_kernel_check: no CUDA device visible (torch.cuda.is_available() is False); use --device cpu for "
            "a dry run of the script's plumbing",
            file=sys.stderr,
        )
        return 2
    import vera_ext

    if args.device == "cuda" and not vera_ext.build_info().get("with_cuda"):
        print(
            f"gpu_kernel_check: vera_ext was built without CUDA kernels ({vera_ext.build_info()}); rebuild here",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "kernel_check.log"))
    json_path = os.path.join(args.out, "kernel_check.json")
    started = time.perf_counter()
    ncu = find_ncu() if args.device == "cuda" and args.mode != "events" else None
    log(f"==== gpu_kernel_check {time.strftime('%F %T')}: {' '.join(sys.argv[1:] if argv is None else argv)}")
    # "ncu" as the JSON written after step 1 says it (a run killed during ncu leaves that one)
    out = {
        "schema": 1,
        "environment": environment(args.device, ncu),
        "shapes": args.shapes,
        "dtypes": args.dtypes,
        "mode": args.mode,
        "rounds": args.rounds,
        "report": args.report,
        "report_error": None,
        "ncu": "pending: ncu had not finished when this was written",
        "conditions": {
            "l2": "flushed before each timed call (a 256 MiB write); ncu: --cache-control all",
            "launches": "the host queues each call's launches while the GPU flushes the L2, so the "
            "event time is the GPU's, without host launch overhead (host syncs in the op excepted)",
            "clocks": "as the GPU runs them (ncu: --clock-control none)",
        },
    }
    try:
        report = load_report(args.report)
    except (OSError, ValueError) as err:
        report, out["report_error"] = None, f"{type(err).__name__}: {err}"
        log(f"gpu_kernel_check: cannot use the report ({out['report_error']}); measuring without predictions")

    cases = select(args.shapes, small=args.device == "cpu", dtypes=args.dtypes)
    measured = measure_cases(cases, args.device, args.rounds, log)
    out["errors"] = measured["errors"]
    launches = measured["launches"]
    source = "torch.profiler" if args.device == "cuda" else "cpu dry run: torch.profiler's CPU ops"
    # Written now too, so that a run killed during ncu still leaves the timings.
    _write_json(json_path, out, compare(cases, report, measured["timings"], launches), source)

    ran = ncu_phase(args, ncu, cases, log)
    out["ncu"] = ran["status"]
    out["errors"].update({f"ncu child: {case}": error for case, error in ran["case_errors"].items()})
    if ran["launches"]:
        launches, source = ran["launches"], "ncu"
    elif ran["status"].startswith("unavailable"):
        log(f"gpu_kernel_check: ncu {ran['status']}; kernel times are torch.profiler's, without counters")
    out["seconds"] = time.perf_counter() - started
    doc = _write_json(json_path, out, compare(cases, report, measured["timings"], launches), source)
    log_tables(log, doc, ran["raw"])
    failed = out["report_error"] or out["errors"] or (args.mode == "ncu" and source != "ncu")
    return 1 if failed else 0


def _write_json(path: str, out: dict, result: dict, source: str) -> dict:
    """Write `out` with the comparison `result` and the launch source to `path`; returns the merged document."""
    doc = {**out, **result, "launch_source": source}
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    return doc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
