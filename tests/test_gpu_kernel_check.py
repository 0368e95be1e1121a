"""benchmarks/gpu_kernel_check.py without a GPU: ncu's raw CSV read (units row, NVTX column, markers), launches
matched to a report, "no counters" told apart from a usable run, the ncu plumbing against a stand-in ncu, the
--device cpu dry run as a program, and benchmarks/gpu_check.sh's syntax."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_kernel_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_kernel_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kc = _load()

NVTX_COLUMN = "thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"
IDENTITY = [
    "ID",
    "Process ID",
    "Process Name",
    "Host Name",
    "Kernel Name",
    "Context",
    "Stream",
    "Block Size",
    "Grid Size",
    "Device",
    "CC",
]
# The metric columns as ncu orders them (alphabetically), with the units its default scaling prints.
METRIC_UNITS = [
    ("dram__bytes_read.sum", "Mbyte"),
    ("dram__bytes_write.sum", "Kbyte"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "%"),
    ("gpu__time_duration.sum", "usecond"),
    ("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "request"),
    ("l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", "request"),
    ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "sector"),
    ("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", "sector"),
    ("launch__registers_per_thread", "register/thread"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "%"),
]
SPIN = "at::cuda::(anonymous namespace)::spin_kernel(long)"
DECODE_U = "void vera::cuda::(anonymous namespace)::decode_u_kernel<__nv_bfloat16, 1, true>(vera::cuda::DecodeParams)"
DECODE_Y = "void vera::cuda::(anonymous namespace)::decode_y_kernel<__nv_bfloat16, 1, true>(vera::cuda::DecodeParams)"
MERGE = "void vera::cuda::(anonymous namespace)::merge_kernel<__nv_bfloat16, false>(vera::cuda::MergeParams)"
CUBLAS = "sm90_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1_execute_segment_k_off_kernel"
# (case, kernel name, block, grid, metric values in METRIC_UNITS order, as printed)
LAUNCHES = [
    ("decode_n1", SPIN, "(1, 1, 1)", "(1, 1, 1)", ["0", "0", "0.01", "1.98", "0", "0", "0", "0", "16", "3.1"]),
    (
        "decode_n1",
        DECODE_U,
        "(256, 1, 1)",
        "(16, 1, 1)",
        ["0.52", "0.26", "3.2", "2.5", "2,048", "64", "32,768", "256", "40", "12.5"],
    ),
    (
        "decode_n1",
        DECODE_Y,
        "(256, 1, 1)",
        "(512, 1, 1)",
        ["33.6", "8.19", "71.8", "11.2", "262,144", "512", "4,194,304", "2,048", "64", "45.3"],
    ),
    ("merge_4096x4096", SPIN, "(1, 1, 1)", "(1, 1, 1)", ["0", "0", "0.01", "1.95", "0", "0", "0", "0", "16", "3.0"]),
    (
        "merge_4096x4096",
        CUBLAS,
        "(384, 1, 1)",
        "(132, 1, 1)",
        ["4.2", "67,108.86", "40.1", "690.3", "n/a", "n/a", "n/a", "n/a", "168", "18.7"],
    ),
    (
        "merge_4096x4096",
        MERGE,
        "(256, 1, 1)",
        "(1024, 1, 1)",
        ["100.7", "33,554.43", "88.0", "28.4", "1,048,576", "524,288", "16,777,216", "4,194,304", "32", "81.0"],
    ),
]


def ncu_csv(with_nvtx=True, launches=LAUNCHES) -> str:
    """A raw page as `ncu --csv --page raw` prints it: a ==PROF== line, the header, the units row, one row per
    launch (the NVTX cell holds the thread id and the quoted range stack), a ==WARNING== line in between."""
    buf = io.StringIO()
    buf.write("==PROF== Connected to process 4242 (/usr/bin/python3.12)\n")
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    header = IDENTITY + ([NVTX_COLUMN] if with_nvtx else []) + [m for m, _ in METRIC_UNITS]
    writer.writerow(header)
    writer.writerow([""] * (len(header) - len(METRIC_UNITS)) + [u for _, u in METRIC_UNITS])
    for i, (case, name, block, grid, values) in enumerate(launches):
        nvtx = (
            [f'4242  "<default domain>:{kc.nvtx_range_name(case)}:none:none:none:none:none:none"'] if with_nvtx else []
        )
        writer.writerow(
            [str(i), "4242", "python3.12", "127.0.0.1", name, "1", "7", block, grid, "0", "9.0"] + nvtx + values
        )
        if i == 2:
            buf.write("==WARNING== Found outstanding GPU clock reset, trying to revert...Success.\n")
    return buf.getvalue()


def report(ops):
    """A kernel_report document as kernel_report.py writes it (the fields this script reads)."""
    return {
        "schema": 1,
        "gpu": {"max_warps_per_sm": {"value": 64, "source": "datasheet"}},
        "kernels": [
            {"key": "decode_u_kernel<__nv_bfloat16, 1, true>", "registers": 40, "occupancy": 1.0},
            {"key": "decode_y_kernel<__nv_bfloat16, 1, true>", "registers": 72, "occupancy": 0.375},
            {"key": "merge_kernel<__nv_bfloat16, false>", "registers": 32, "occupancy": 1.0},
        ],
        "ops": ops,
    }


def kernel_event(key, us, dram, ld=16.0, st=4.0, **model):
    """A predicted launch; `model` adds what the model took from the binary (registers, occupancy,
    resident_warps_per_sm)."""
    return {
        "kind": "kernel",
        "key": key,
        "grid": [16, 1, 1],
        "block": [256, 1, 1],
        "predicted_us": us,
        "dram_bytes": dram,
        "sectors_per_request": {"load": ld, "store": st},
        **model,
    }


DECODE_OP = {
    "case": "decode_n1",
    "group": "decode",
    "predicted_us": 15.0,
    "floor_us": 7.8,
    "floor_what": "W",
    "events": [
        kernel_event(
            "decode_u_kernel<__nv_bfloat16, 1, true>", 3.0, 0.8e6, registers=42, occupancy=0.5, resident_warps_per_sm=16
        ),
        kernel_event("decode_y_kernel<__nv_bfloat16, 1, true>", 10.0, 41.9e6),
        kernel_event("decode_y_kernel<__nv_bfloat16, 1, true>", 1.0, 1e3),
        {"kind": "aten", "op": "aten.add_.Tensor", "predicted_us": 2.0},
    ],
}
MERGE_OP = {
    "case": "merge_4096x4096",
    "group": "merge",
    "predicted_us": 800.0,
    "floor_us": 700.0,
    "floor_what": "GEMM",
    "events": [{"kind": "gemm", "op": "aten.mm.default", "m": 4096, "n": 4096, "k": 256, "predicted_us": 650.0}],
}


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def test_parse_ncu_csv_reads_names_keys_cases_and_scales_units():
    launches = kc.parse_ncu_csv(ncu_csv())
    assert [l["key"] for l in launches] == [
        "spin_kernel",
        "decode_u_kernel<__nv_bfloat16, 1, true>",
        "decode_y_kernel<__nv_bfloat16, 1, true>",
        "spin_kernel",
        CUBLAS,
        "merge_kernel<__nv_bfloat16, false>",
    ]
    assert [l["case"] for l in launches] == ["decode_n1"] * 3 + ["merge_4096x4096"] * 3
    y = launches[2]
    assert y["name"] == DECODE_Y and y["id"] == 2 and y["grid"] == "(512, 1, 1)" and y["block"] == "(256, 1, 1)"
    m = y["metrics"]
    assert m["dram__bytes_read.sum"] == pytest.approx(33.6e6)  # Mbyte: decimal, as ncu prints it
    assert m["dram__bytes_write.sum"] == pytest.approx(8190.0)  # Kbyte
    assert m["gpu__time_duration.sum"] == pytest.approx(11.2)  # usecond -> us
    assert m["l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"] == 4194304  # thousands separators
    assert m["launch__registers_per_thread"] == 64 and m["sm__warps_active.avg.pct_of_peak_sustained_active"] == 45.3
    assert launches[4]["metrics"]["l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"] is None  # n/a


def test_nvtx_range_round_trips_a_dtype_suffix():
    rows = [("train_fwd@fp16", DECODE_U, "(256, 1, 1)", "(16, 1, 1)", LAUNCHES[1][4])]
    assert kc.nvtx_range_name("train_fwd@fp16") == "vkc-train_fwd.fp16"
    assert [l["case"] for l in kc.parse_ncu_csv(ncu_csv(launches=rows))] == ["train_fwd@fp16"]


def test_parse_ncu_csv_time_in_nanoseconds_and_no_header():
    text = ncu_csv().replace('"usecond"', '"nsecond"')
    assert kc.parse_ncu_csv(text)[2]["metrics"]["gpu__time_duration.sum"] == pytest.approx(0.0112)
    assert kc.parse_ncu_csv("==PROF== Disconnected from process 4242\n") == []


def test_parse_ncu_csv_refuses_a_unit_it_does_not_know():
    with pytest.raises(ValueError, match="'furlong'.*dram__bytes_read.sum"):
        kc.parse_ncu_csv(ncu_csv().replace('"Mbyte"', '"furlong"'))


def test_parse_ncu_csv_leaves_out_an_unrequested_metric_in_an_unknown_unit():
    text = (
        '"ID","Kernel Name","device__attribute_clock_rate","gpu__time_duration.sum"\n'
        '"","","khz","nsecond"\n"0","k(int)","1980000","1,500"\n'
    )
    (launch,) = kc.parse_ncu_csv(text)
    assert launch["metrics"] == {"gpu__time_duration.sum": 1.5}
    assert launch["key"] == "k" and launch["case"] is None and launch["grid"] is None


def test_assign_cases_keeps_nvtx_cases_and_drops_markers():
    launches = kc.assign_cases(kc.parse_ncu_csv(ncu_csv()), [])
    assert [(l["case"], l["key"][:8]) for l in launches] == [
        ("decode_n1", "decode_u"),
        ("decode_n1", "decode_y"),
        ("merge_4096x4096", "sm90_xmm"),
        ("merge_4096x4096", "merge_ke"),
    ]


def test_assign_cases_by_markers_without_an_nvtx_column():
    launches = kc.parse_ncu_csv(ncu_csv(with_nvtx=False))
    assert all(l["case"] is None for l in launches)
    assigned = kc.assign_cases(launches, ["decode_n1", "merge_4096x4096"])
    assert [l["case"] for l in assigned] == ["decode_n1"] * 2 + ["merge_4096x4096"] * 2
    with pytest.raises(ValueError, match="2 case markers.*marked 1 cases"):
        kc.assign_cases(launches, ["decode_n1"])
    with pytest.raises(ValueError, match="before the first case marker"):
        kc.assign_cases(launches[1:], ["merge_4096x4096"])


# ---------------------------------------------------------------------------------------------------------------
# No counters


PERM = (
    "==PROF== Connected to process 4242 (/usr/bin/python3.12)\n"
    "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters on "
    "the target device 0. For instructions on enabling permissions and to get more information see "
    "https://developer.nvidia.com/ERR_NVGPUCTRPERM\n==PROF== Disconnected from process 4242\n"
)
UNSUPPORTED = "==PROF== Connected to process 4242\n==ERROR== Profiling is not supported on this device\n"
NOTHING = (
    "==PROF== Connected to process 4242\n==PROF== Disconnected from process 4242\n"
    "==WARNING== No kernels were profiled.\n"
)
APP_ERROR = "==ERROR== The application returned an error code (1).\n"


@pytest.mark.parametrize(
    "returncode, output, want",
    [
        (1, PERM, "ERR_NVGPUCTRPERM"),
        (0, PERM + ncu_csv(), "ERR_NVGPUCTRPERM"),
        (1, UNSUPPORTED, "Profiling is not supported on this device"),
        (0, NOTHING, "no metric rows in ncu's output ==WARNING== No kernels were profiled."),
        (1, APP_ERROR, "==ERROR== The application returned an error code (1)."),
        (9, "", "ncu exited with status 9"),
    ],
)
def test_ncu_problem_names_the_reason(returncode, output, want):
    problem = kc.ncu_problem(returncode, output, kc.parse_ncu_csv(output))
    assert problem is not None and want in problem


def test_ncu_problem_all_values_missing_and_usable_runs():
    rows = [(c, n, b, g, ["n/a"] * len(v)) for c, n, b, g, v in LAUNCHES]
    text = ncu_csv(launches=rows)
    assert "no metric values" in kc.ncu_problem(0, text, kc.parse_ncu_csv(text))
    text = ncu_csv()
    assert kc.ncu_problem(0, text, kc.parse_ncu_csv(text)) is None
    # a late case failed in the child: the counters of the others are still good
    assert kc.ncu_problem(1, text + APP_ERROR, kc.parse_ncu_csv(text)) is None


# ---------------------------------------------------------------------------------------------------------------
# Matching to the report


def _cases(*names):
    return [c for c in kc.select("all") if c.name in names]


def test_compare_matches_by_key_and_occurrence_and_sums_the_others():
    launches = kc.assign_cases(kc.parse_ncu_csv(ncu_csv()), [])
    rep = report([DECODE_OP, MERGE_OP])
    result = kc.compare(
        _cases("decode_n1", "merge_4096x4096"),
        rep,
        {"decode_n1": (20.0, 1.0), "merge_4096x4096": (900.0, 5.0)},
        launches,
    )
    rows = [(r["case"], r["key"], r["occurrence"], r["status"]) for r in result["kernels"]]
    assert rows == [
        ("decode_n1", "decode_u_kernel<__nv_bfloat16, 1, true>", 0, "matched"),
        ("decode_n1", "decode_y_kernel<__nv_bfloat16, 1, true>", 0, "matched"),
        ("decode_n1", "decode_y_kernel<__nv_bfloat16, 1, true>", 1, "not launched"),
        ("merge_4096x4096", "merge_kernel<__nv_bfloat16, false>", 0, "not predicted"),
    ]
    u, y = result["kernels"][:2]
    # the model's own registers and resident warps (16 of 64) when the event has them ...
    assert u["predicted"]["registers"] == 42 and u["predicted"]["warps_active_pct"] == 25.0
    # ... else the report's kernel entry
    assert y["predicted"] == {
        "time_us": 10.0,
        "registers": 72,
        "dram_bytes": 41.9e6,
        "ld_sectors_per_request": 16.0,
        "st_sectors_per_request": 4.0,
        "grid": [16, 1, 1],
        "block": [256, 1, 1],
        "warps_active_pct": 37.5,
    }
    assert y["measured"]["registers"] == 64 and y["measured"]["time_us"] == pytest.approx(11.2)
    assert y["measured"]["dram_bytes"] == pytest.approx(33.6e6 + 8190.0)
    assert y["measured"]["ld_sectors_per_request"] == pytest.approx(16.0)
    assert y["measured"]["st_sectors_per_request"] == pytest.approx(4.0)
    assert result["kernels"][2]["measured"] is None and result["kernels"][3]["predicted"] is None

    decode, merge = result["ops"]
    assert decode["ratio_measured_to_predicted"] == pytest.approx(20.0 / 15.0)
    assert decode["ratio_measured_to_floor"] == pytest.approx(20.0 / 7.8)
    assert decode["predicted_dram_bytes"] == pytest.approx(0.8e6 + 41.9e6 + 1e3)
    assert decode["effective_bytes_per_s"] == pytest.approx((0.8e6 + 41.9e6 + 1e3) / 20e-6)
    assert decode["kernel_sum_us"] == pytest.approx(2.5 + 11.2)
    assert decode["predicted_other_us"] == 2.0 and decode["measured_other_us"] is None
    # cuBLAS is not ours: summed into the op and listed by name; the unpredicted merge_kernel is ours (namespace)
    assert merge["other_kernels"] == [{"name": CUBLAS, "count": 1, "time_us": pytest.approx(690.3)}]
    assert merge["measured_ours_us"] == pytest.approx(28.4) and merge["predicted_ours_us"] is None
    assert merge["kernel_sum_us"] == pytest.approx(690.3 + 28.4)
    assert merge["measured_dram_bytes"] == pytest.approx(4.2e6 + 67108.86e3 + 100.7e6 + 33554.43e3)
    lines = kc.summary_lines({**result, "launch_source": "ncu", "ncu": "ok: 4 launches profiled"})
    assert lines[0] == "KERNEL_CHECK source: ncu; ncu: ok: 4 launches profiled"
    assert "2 matched, 1 not launched, 1 not predicted" in lines[2]
    table = kc.kernels_table(result["kernels"])
    assert "decode_y_kernel<__nv_bfloat16, 1, true> #2" in table and "72/64" in table
    assert "decode_n1" in kc.ops_table(result["ops"])


def test_compare_on_the_committed_report():
    """docs/kernel_report.json is kernel_report.py's output at the target shapes: the fields read here are there."""
    path = REPO / "docs" / "kernel_report.json"
    rep = kc.load_report(str(path))
    launches = kc.assign_cases(kc.parse_ncu_csv(ncu_csv()), [])
    result = kc.compare(_cases("decode_n1"), rep, {"decode_n1": (30.0, 1.0)}, launches)
    matched = [r for r in result["kernels"] if r["status"] == "matched"]
    assert [r["key"] for r in matched] == [
        "decode_u_kernel<__nv_bfloat16, 1, true>",
        "decode_y_kernel<__nv_bfloat16, 1, true>",
    ]
    for row in matched:
        assert all(
            row["predicted"][k] is not None
            for k in (
                "time_us",
                "registers",
                "dram_bytes",
                "warps_active_pct",
                "ld_sectors_per_request",
                "st_sectors_per_request",
            )
        )
    (op,) = result["ops"]
    assert op["predicted_us"] > 0 and op["floor_us"] > 0 and op["predicted_dram_bytes"] > 0
    assert op["ratio_measured_to_predicted"] == pytest.approx(30.0 / op["predicted_us"])


def test_compare_without_report_or_measurement():
    result = kc.compare(_cases("decode_n4"), None, {}, [])
    (row,) = result["ops"]
    assert result["kernels"] == [] and row["predicted_us"] is None and row["measured_us"] is None
    assert row["ratio_measured_to_predicted"] is None and row["other_kernels"] == []


def test_load_report_names_what_is_wrong(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": 2}))
    with pytest.raises(ValueError, match='"schema": 1, got 2'):
        kc.load_report(str(path))
    path.write_text(json.dumps({"schema": 1, "ops": [{"case": "x"}], "kernels": []}))
    with pytest.raises(ValueError, match='"ops" to be a list of objects with case, events'):
        kc.load_report(str(path))
    path.write_text(json.dumps(report([DECODE_OP])))
    assert kc.load_report(str(path))["ops"][0]["case"] == "decode_n1"


# ---------------------------------------------------------------------------------------------------------------
# The ncu plumbing, against a stand-in for ncu

FAKE_NCU = """#!{python}
# Stands in for ncu: checks the options, writes a canned raw page to --log-file and, as the child would, the
# manifest; or prints canned error output; or writes a page with NVTX ranges and hangs. MODE selects which.
import json, sys, time
args = sys.argv[1:]
mode = {mode!r}
assert "--profile-from-start" in args and args[args.index("--profile-from-start") + 1] == "off", args
assert "--child" in args and "--nvtx" in args and args[args.index("--dtypes") + 1] == "bf16", args
if mode == "perm":
    print(open({perm!r}).read())
    sys.exit(1)
if mode == "hang":
    open(args[args.index("--log-file") + 1], "w").write(open({nvtx_csv!r}).read())
    time.sleep(120)
open(args[args.index("--log-file") + 1], "w").write(open({csv!r}).read())
cases = [{{"case": "decode_n1", "marked": True, "error": None}},
         {{"case": "merge_4096x4096", "marked": True, "error": None}},
         {{"case": "safe_merge_4096x4096", "marked": False, "error": "RuntimeError: out of memory"}}]
json.dump({{"cases": cases}}, open(args[args.index("--manifest") + 1], "w"))
"""


def _fake_ncu(tmp_path, mode):
    csv_path, nvtx_path, perm_path = tmp_path / "canned.csv", tmp_path / "nvtx.csv", tmp_path / "perm.txt"
    csv_path.write_text(ncu_csv(with_nvtx=False))
    nvtx_path.write_text(ncu_csv())
    perm_path.write_text(PERM)
    exe = tmp_path / f"ncu_{mode}"
    exe.write_text(
        FAKE_NCU.format(
            python=sys.executable, mode=mode, csv=str(csv_path), nvtx_csv=str(nvtx_path), perm=str(perm_path)
        )
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_ncu_command_profiles_only_the_marked_ranges():
    cmd = kc.ncu_command("/x/ncu", "/tmp/log.csv", ["python", "child.py", "--child"])
    assert cmd[0] == "/x/ncu" and cmd[-3:] == ["python", "child.py", "--child"]
    assert cmd[cmd.index("--metrics") + 1].split(",") == list(kc.METRICS)
    for option, value in [
        ("--page", "raw"),
        ("--profile-from-start", "off"),
        ("--print-kernel-base", "demangled"),
        ("--clock-control", "none"),
        ("--log-file", "/tmp/log.csv"),
    ]:
        assert cmd[cmd.index(option) + 1] == value
    assert "--csv" in cmd and "--nvtx" in cmd


def test_run_ncu_reads_the_log_file_and_the_manifest(tmp_path):
    ran = kc.run_ncu(_fake_ncu(tmp_path, "ok"), "all", "bf16", timeout_s=60)
    assert ran["status"] == "ok: 4 launches profiled", ran["raw"]
    assert [l["case"] for l in ran["launches"]] == ["decode_n1"] * 2 + ["merge_4096x4096"] * 2
    assert ran["case_errors"] == {"safe_merge_4096x4096": "RuntimeError: out of memory"}


def test_run_ncu_without_counters_is_unavailable(tmp_path):
    ran = kc.run_ncu(_fake_ncu(tmp_path, "perm"), "all", "bf16", timeout_s=60)
    assert ran["status"].startswith("unavailable: no permission") and ran["launches"] == []
    assert "ERR_NVGPUCTRPERM" in ran["raw"]


def test_run_ncu_killed_at_its_limit_keeps_what_ncu_wrote(tmp_path):
    ran = kc.run_ncu(_fake_ncu(tmp_path, "hang"), "all", "bf16", timeout_s=3)
    assert ran["status"] == "ok: 4 launches profiled; killed after 3 s, partial"
    assert [l["case"] for l in ran["launches"]] == ["decode_n1"] * 2 + ["merge_4096x4096"] * 2


# ---------------------------------------------------------------------------------------------------------------
# The program


def test_cpu_dry_run_as_a_program(tmp_path):
    small = [c for c in kc.select("decode", small=True)]
    ops = [
        {
            "case": small[0].name,
            "group": "decode",
            "predicted_us": 10.0,
            "floor_us": 8.0,
            "floor_what": "W",
            "events": [
                kernel_event("decode_u_kernel<float>", 3.0, 1e6),
                {"kind": "aten", "op": "aten.add_.Tensor", "predicted_us": 1.0},
            ],
        }
    ]
    rep = tmp_path / "report.json"
    rep.write_text(
        json.dumps(
            {"schema": 1, "gpu": {}, "kernels": [{"key": "decode_u_kernel<float>", "registers": 40}], "ops": ops}
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--report",
            str(rep),
            "--out",
            str(out),
            "--shapes",
            "decode",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "kernel_check.json").read_text())
    assert doc["ncu"] == "not run (--device cpu, --mode auto)" and doc["report_error"] is None
    assert [r["case"] for r in doc["ops"]] == [c.name for c in small]
    first = doc["ops"][0]
    assert first["measured_us"] > 0 and first["ratio_measured_to_predicted"] == pytest.approx(
        first["measured_us"] / 10.0
    )
    assert first["other_kernels"], "the CPU op's ATen calls should be listed"
    assert [(r["key"], r["status"]) for r in doc["kernels"]] == [("decode_u_kernel<float>", "not launched")]
    log = (out / "kernel_check.log").read_text()
    assert "==== predicted vs measured" in log and "KERNEL_CHECK kernels: 0 matched, 1 not launched" in log


def test_missing_report_still_measures_and_exits_1(tmp_path, capsys):
    rc = kc.main(
        [
            "--device",
            "cpu",
            "--report",
            str(tmp_path / "none.json"),
            "--out",
            str(tmp_path),
            "--shapes",
            "merge",
            "--rounds",
            "1",
        ]
    )
    assert rc == 1
    doc = json.loads((tmp_path / "kernel_check.json").read_text())
    assert "No such file" in doc["report_error"]
    assert all(r["measured_us"] > 0 for r in doc["ops"]) and len(doc["ops"]) == len(kc.select("merge"))
    assert "measuring without predictions" in capsys.readouterr().out


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert kc.main(["--report", str(tmp_path / "r.json"), "--out", str(tmp_path)]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--rounds", "0"], "--rounds: expected a positive integer, got '0'"),
        (
            ["--dtypes", "bf16,int8"],
            "--dtypes: expected a comma-separated list among bf16, fp16, fp32, got 'bf16,int8'",
        ),
        (["--shapes", "prefill"], "--shapes: invalid choice: 'prefill'"),
        (["--device", "cpu", "--mode", "ncu"], "--mode ncu needs --device cuda"),
        (["--child"], "--child needs --manifest PATH"),
    ],
)
def test_bad_arguments_name_the_argument(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        kc.parse_args(argv)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
