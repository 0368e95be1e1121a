"""`python -m vera_ext bench`: argument handling, an end-to-end --quick run on the CPU (JSON, PNG, trace), the
FLOP counts behind its floors checked against torch's FlopCounterMode on PEFT's VeRA layer, and the GPU plan
(`--preset h200`) through its CPU dry run: sections, per-layer times, floors, targets, log and JSON.

In-process runs use the hidden test-sized preset (`--shape tiny`: 64 -> 48, r=16) to stay fast.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vera_ext import __main__ as entry
from vera_ext.bench import cases, cli, preset
from vera_ext.bench.cases import CASES, case_cost
from vera_ext.bench.model_cases import MODEL_CASES
from vera_ext.bench.preset import PRESET_CASES, PRESETS, PresetRun, overhead_lines, target_lines
from vera_ext.bench.report import Result, set_ratios
from vera_ext.projection import generate_projection

from vera_testing import make_peft_vera_linear

pytest.importorskip("peft")

TINY = ["--device", "cpu", "--shape", "tiny", "--quick", "--no-progress"]
REQUIRED_KEYS = {
    "case",
    "shape",
    "dtype",
    "device",
    "implementation",
    "median_ms",
    "spread_ms",
    "ratio_to_base",
    "ratio_to_peft",
    "saved_bytes",
    "flops",
    "bytes",
    "floor_ms",
    "metric",
    "extra",
}


@pytest.fixture
def no_measuring(monkeypatch):
    """Argument errors must come before any measuring."""

    def refuse(*args, **kwargs):
        raise AssertionError("measuring started although the arguments were invalid")

    monkeypatch.setattr(cli, "run_suite", refuse)


def _expect_usage_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--case", "nope"], ["--case", "'nope'", "train_fwd"]),
        (["--case", "decode,warp_drive"], ["'warp_drive'"]),
        (["--case", ","], ["--case", "(none given)"]),
        (["--shape", "gpt-9"], ["--shape", "'gpt-9'", "llama2-7b-qv"]),
        (["--rounds", "0"], ["--rounds", "positive integer", "'0'"]),
        (["--rounds", "-3"], ["--rounds", "positive integer"]),
        (["--rounds", "many"], ["--rounds", "positive integer"]),
        (["--r", "0"], ["--r", "positive integer"]),
        (["--dtype", "int8"], ["--dtype", "invalid choice"]),
        (["--device", "tpu"], ["--device", "invalid choice"]),
        (["--case", "decode_stack"], ["--case", "'decode_stack'", "--preset"]),
        (["--preset", "h100"], ["--preset", "invalid choice"]),
        (["--preset", "h200", "--shape", "cpu-1024"], ["--shape", "--preset h200", "fixes the shapes"]),
        (["--preset", "h200", "--dtype", "fp32"], ["--dtype", "--preset h200"]),
        (["--preset", "h200", "--quick"], ["--quick", "--preset h200"]),
        (["--preset", "h200", "--plot", "p.png"], ["--plot", "--preset h200", "--json"]),
        (["--preset", "h200", "--case", "decode"], ["--case", "'decode'", "of --preset h200", "decode_stack"]),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(capsys, no_measuring, argv, fragments):
    _expect_usage_error(capsys, ["--device", "cpu"] + argv if argv[0] != "--device" else argv, *fragments)


def test_cuda_without_gpu_is_a_usage_error(capsys, no_measuring):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    _expect_usage_error(capsys, ["--device", "cuda"], "--device cuda", "no CUDA device")


def test_unwritable_outputs_are_refused_before_measuring(capsys, no_measuring, tmp_path):
    missing = tmp_path / "no_such_dir" / "out.json"
    _expect_usage_error(capsys, TINY + ["--json", str(missing)], "--json", "does not exist")
    _expect_usage_error(capsys, TINY + ["--plot", str(tmp_path)], "--plot", "is a directory")
    _expect_usage_error(capsys, TINY + ["--log", str(missing)], "--log", "does not exist")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _expect_usage_error(capsys, TINY + ["--trace", str(a_file)], "--trace", "not a directory")
    _expect_usage_error(capsys, TINY + ["--trace", str(a_file / "sub")], "--trace", "cannot create")


def test_list_names_every_case_and_public_shape(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in CASES + PRESET_CASES + ("cpu-1024", "llama2-7b-qv", "h200"):
        assert name in out
    assert "tiny" not in out  # the test preset stays out of the listing


def test_defaults_follow_the_device():
    parser = cli.make_parser()
    s = cli.parse_settings(parser, parser.parse_args(["--device", "cpu"]))
    assert (s.shape.name, s.dtype, s.cases, s.rounds) == ("cpu-1024", torch.float32, CASES + MODEL_CASES, 15)
    # the CPU targets (benchmarks/bench_cpu.py) are measured at these sizes: the CPU default must not drift
    assert (s.shape.in_f, s.shape.out_f, s.shape.r, s.shape.n_train, s.shape.n_decode) == (1024, 1024, 256, 2048, 1)
    q = cli.parse_settings(
        parser,
        parser.parse_args(
            ["--device", "cpu", "--quick", "--case", "merge,decode", "--r", "8", "--n", "12", "--dtype", "bf16"]
        ),
    )
    assert q.cases == ("decode", "merge") and q.rounds == 5 and q.dtype == torch.bfloat16
    assert (q.shape.r, q.shape.n_train, q.shape.n_mixed) == (8, 12, cli.SHAPES["cpu-1024"].n_mixed_quick)


def test_quick_run_writes_consistent_json_and_a_png(capsys, tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    # the layer cases (the model cases, also in the default list: tests/test_bench_model.py)
    assert cli.main(TINY + ["--case", ",".join(CASES), "--json", str(json_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    for case in CASES:
        assert case in out

    records = json.loads(json_path.read_text())
    assert {r["case"] for r in records} == set(CASES)
    for r in records:
        assert REQUIRED_KEYS <= r.keys(), REQUIRED_KEYS - r.keys()
        assert (r["device"], r["dtype"], r["shape"]["preset"]) == ("cpu", "float32", "tiny")
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["implementation"]] = r
    for case, impls in by_case.items():
        expected = {"peft", "vera_ext"} | (set() if case == "merge" else {"base"})
        assert impls.keys() == expected, (case, impls.keys())
        for impl, r in impls.items():
            if r["metric"] == "memory":
                assert r["median_ms"] is None and r["saved_bytes"] >= 0
                value, ref = r["saved_bytes"], {k: v["saved_bytes"] for k, v in impls.items()}
            else:
                assert r["median_ms"] > 0 and r["spread_ms"] >= 0
                assert r["flops"] > 0 and r["bytes"] > 0
                machine = r["extra"]["machine"]
                floor = max(r["flops"] / machine["gemm_flops_per_s"], r["bytes"] / machine["copy_bytes_per_s"])
                assert r["floor_ms"] == pytest.approx(floor * 1e3)
                value, ref = r["median_ms"], {k: v["median_ms"] for k, v in impls.items()}
            assert r["ratio_to_peft"] == pytest.approx(value / ref["peft"])
            if "base" in ref and ref["base"]:
                assert r["ratio_to_base"] == pytest.approx(value / ref["base"])
            else:
                assert r["ratio_to_base"] is None
    # Both adapters compute the same function (same projection and lambdas): the benchmark compares like with like.
    assert by_case["train_fwd"]["vera_ext"]["extra"]["rel_diff_vs_peft_output"] < 1e-5
    assert by_case["decode_mixed"]["vera_ext"]["extra"]["rel_diff_vs_peft_output"] < 1e-5
    # vera_ext keeps only u (N x r) for backward; PEFT keeps more (its N x O product among others).
    saved = {k: v["saved_bytes"] for k, v in by_case["saved_activations"].items()}
    shape = by_case["saved_activations"]["vera_ext"]["shape"]
    n, r = shape["N"], shape["r"]
    assert saved["base"] == 0 and saved["vera_ext"] == n * r * 4 < saved["peft"]

    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_trace_names_our_ops_and_each_implementation(capsys, tmp_path):
    trace_dir = tmp_path / "traces"
    assert (
        cli.main(TINY + ["--case", "train_fwd_bwd,decode_mixed,merge", "--rounds", "2", "--trace", str(trace_dir)]) == 0
    )
    out = capsys.readouterr().out
    expected_ops = {
        # (a training step: the training form, docs/DESIGN.md §2.7)
        "train_fwd_bwd": {"vera_ext::vera_project", "vera_ext::vera_linear_apply", "vera_ext::vera_apply_backward"},
        "decode_mixed": {"vera_ext::vera_linear_forward"},
        "merge": {"vera_ext::vera_merge_"},
    }
    for case, ops in expected_ops.items():
        path = trace_dir / f"{case}.json"
        assert f"trace: {path}" in out
        trace = json.loads(path.read_text())
        names = {e.get("name") for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)}
        assert ops <= names, (case, sorted(n for n in names if n and "vera" in n))
        impls = ("peft", "vera_ext") if case == "merge" else ("base", "peft", "vera_ext")
        assert {f"bench/{case}/{impl}" for impl in impls} <= names


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("flag, shown", [([], True), (["--no-progress"], False)])
def test_progress_bar_goes_to_a_terminal_stderr_only(monkeypatch, capsys, flag, shown):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["--device", "cpu", "--shape", "tiny", "--quick", "--case", "merge"] + flag) == 0
    assert ("vera_ext bench:" in terminal.getvalue()) == shown
    assert "vera_ext bench:" not in capsys.readouterr().out.split("\n", 1)[1]  # stdout: the table's header only


@pytest.mark.cuda
def test_cuda_quick_run_times_with_events_and_traces_kernels(capsys, tmp_path):
    json_path, trace_dir = tmp_path / "cuda.json", tmp_path / "traces"
    assert (
        cli.main(
            [
                "--device",
                "cuda",
                "--shape",
                "tiny",
                "--quick",
                "--no-progress",
                "--case",
                "train_fwd,decode",
                "--json",
                str(json_path),
                "--trace",
                str(trace_dir),
            ]
        )
        == 0
    )
    records = json.loads(json_path.read_text())
    assert {(r["device"], r["dtype"]) for r in records} == {("cuda", "bfloat16")}
    assert all(r["median_ms"] > 0 for r in records)
    trace = json.loads((trace_dir / "decode.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert any(e.get("cat") == "kernel" for e in events)  # GPU activity recorded, not only CPU ops
    assert "vera_ext::vera_linear_forward" in {e.get("name") for e in events}


def test_interleaved_samples_settle_first_and_cold_calls_follow_their_setup():
    from vera_ext.bench.timing import time_interleaved

    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    time_interleaved(fns, "cpu", rounds=2, inner=8, warmup=1)
    # warm-up: one call each; then per round and fn, 8 // 4 = 2 untimed settling calls and the 8 timed ones
    assert log == ["a", "b"] + (["a"] * 10 + ["b"] * 10) * 2

    log.clear()
    time_interleaved(fns, "cpu", rounds=3, warmup=1, before_each=lambda: log.append("evict"))
    assert log == ["a", "b"] + ["evict", "a", "evict", "b"] * 3  # one timed call after each eviction


def test_only_decode_cold_is_timed_after_an_eviction(monkeypatch, capsys):
    setups = []

    def fake_timing(fns, device, rounds, inner, warmup, before_each=None):
        setups.append(before_each)
        return {k: (1.0, 0.0) for k in fns}

    monkeypatch.setattr(cli, "time_interleaved", fake_timing)
    monkeypatch.setitem(cases.EVICT_MIB, "cpu", 1)
    assert cli.main(TINY + ["--case", "decode,decode_cold"]) == 0
    assert "decode_cold" in capsys.readouterr().out
    plain, cold = setups  # CASES order
    assert plain is None and callable(cold)
    cold()  # fills the eviction buffer


@pytest.mark.parametrize("case", ["train_fwd", "train_fwd_bwd", "decode", "merge"])
def test_flop_counts_match_torch_flop_counter_on_peft(case):
    """The floors' FLOPs are those PEFT's VeRA layer (and the plain base layer) actually run, as counted by torch."""
    n, i, o, r = 6, 40, 24, 8
    base = nn.Linear(i, o).requires_grad_(False)
    A, B = generate_projection(r, i, o, prng_key=0)
    peft = make_peft_vera_linear(base, A, B, r, init_weights=False)
    x = torch.randn(n, i, requires_grad=case.startswith("train"))
    g = torch.randn(n, o)

    def run(layer, adapter):
        if case == "merge":
            layer.merge()
            layer.unmerge()
        elif case == "train_fwd_bwd":  # .backward: FlopCounterMode's module hooks do not support autograd.grad
            layer(x).backward(g)
        else:
            layer(x)

    shape = {"N": n, "I": i, "O": o, "r": r}
    for layer, adapter in [(peft, True)] if case == "merge" else [(base, False), (peft, True)]:
        with FlopCounterMode(display=False) as counter:
            run(layer, adapter)
        assert case_cost(case, shape, adapter, 4)[0] == counter.get_total_flops(), (case, adapter)


def test_module_entry_dispatches_commands(capsys, monkeypatch):
    assert entry.main([]) == 0
    assert "bench" in capsys.readouterr().out
    assert entry.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        entry.main(["bench", "--rounds", "0"])
    assert info.value.code == 2
    seen = []
    demo = types.ModuleType("vera_ext.demo")
    demo.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "vera_ext.demo", demo)
    monkeypatch.setattr("vera_ext.demo", demo, raising=False)
    assert entry.main(["demo", "--steps", "3"]) == 0 and seen == [["--steps", "3"]]


@pytest.mark.slow
def test_python_dash_m_runs_as_a_program(tmp_path):
    """The real entry point in a fresh interpreter (slow: importing torch and peft takes seconds)."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vera_ext", "bench"] + TINY + ["--case", "decode", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert {r["implementation"] for r in json.loads(out.read_text())} == {"base", "peft", "vera_ext"}


def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_decode_script_runs_and_agrees_with_peft(capsys):
    script = _load_script("bench_model_decode")
    assert script.main(["--blocks", "2", "--hidden", "32", "--ffn", "48", "--r", "8", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    rel = float(out.split("rel. diff vs PEFT ")[1].split()[0])
    assert rel < 1e-5  # the same model, lambdas and projection: the comparison is like for like
    for impl in ("base", "peft", "vera_ext"):
        assert f"  {impl}" in out


def test_cpu_targets_script_prints_the_three_targets(capsys, monkeypatch):
    script = _load_script("bench_cpu")
    monkeypatch.setitem(cases.SHAPES, "cpu-1024", cases.SHAPES["tiny"])
    monkeypatch.setitem(cases.EVICT_MIB, "cpu", 1)
    assert script.main(["--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for what in ("train fwd+bwd time", "saved activations", "decode N=1 forward", "caches evicted"):
        assert what in out, what


# ------------------------------------------------------------------------------------ --preset h200 (the GPU plan)

DRY_RUN = ["--device", "cpu", "--preset", "h200", "--no-progress"]
STACK_IMPLS = {"base", "peft", "vera_ext", "mixed layer", "mixed op"}


def _calls_once(fns, device, rounds, inner, warmup, before_each=None):
    """time_interleaved's stand-in: calls every implementation once; "times" 1, 2, 3, ... ms in fns' order."""
    out = {}
    for i, (name, fn) in enumerate(fns.items()):
        fn()
        out[name] = (float(i + 1), 0.5)
    return out


def test_h200_plan_dry_run_on_the_cpu(capsys, tmp_path):
    """The GPU plan end to end at its CPU size: every section, the log, and the JSON document gpu_check.sh keeps."""
    json_path, log_path = tmp_path / "gpu_bench.json", tmp_path / "gpu_bench.log"
    assert cli.main(DRY_RUN + ["--json", str(json_path), "--log", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert log_path.read_text() == out  # the log is what was printed
    plan = PRESETS["h200"]["cpu"]
    doc = json.loads(json_path.read_text())
    assert {"environment", "settings", "ceilings", "info", "errors", "records", "targets", "seconds"} <= doc.keys()
    assert doc["errors"] == {} and doc["settings"]["dry_run"] and doc["ceilings"]["gemm_n"] == plan.gemm_n
    records = doc["records"]
    assert {r["case"] for r in records} == {
        "train_fwd",
        "train_fwd_bwd",
        "saved_activations",
        "decode_stack",
        "merge_stack",
    }
    for n in plan.decode_ns:
        rows = {r["implementation"]: r for r in records if r["case"] == "decode_stack" and r["shape"]["N"] == n}
        assert rows.keys() == STACK_IMPLS
        assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 and r["ratio_to_base"] for r in rows.values())
        assert (rows["mixed op"]["shape"]["M"], rows["mixed op"]["shape"]["L"]) == (plan.adapters, plan.layers)
        # the op call and the layer call compute the same rows; ours and PEFT's the same function (PEFT's adapter
        # in fp32, ours in bf16)
        assert rows["mixed op"]["extra"]["rel_diff_vs_mixed_layer"] < 1e-6
        assert rows["vera_ext"]["extra"]["rel_diff_vs_peft_output"] < 2e-2
    merge = {r["implementation"]: r for r in records if r["case"] == "merge_stack"}
    assert merge.keys() == {"fp32 mm", "vera_ext op", "vera_ext", "peft"}
    assert all(r["floor_ms"] == merge["fp32 mm"]["median_ms"] for r in merge.values())
    assert doc["info"]["peft_dtypes"] == {
        "lambda": "torch.float32",
        "vera_A": "torch.float32",
        "base_weight": "torch.bfloat16",
    }  # PEFT's defaults on a bf16 model
    assert doc["info"]["decode_stack_graph"].startswith("not run")
    assert len(doc["targets"]) == 2 + len(plan.decode_ns) + 2  # training, eager decode per N, merge (no graphs)
    assert sum(line.startswith("TARGET ") for line in out.splitlines()) == len(doc["targets"])
    for section in ("training", "decode", "merge"):
        assert f"[{section}] done in" in out
    tail = out[out.index("\ncase ") :]  # what gpu_check.sh prints of the log: from the table's header on
    assert "mixed op" in tail and "TARGET" in tail and "DRY RUN" in tail


def test_stack_times_are_per_layer_and_merge_floors_are_the_fp32_mm(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "time_interleaved", _calls_once)
    json_path = tmp_path / "plan.json"
    assert cli.main(DRY_RUN + ["--case", "decode_stack,merge_stack", "--json", str(json_path)]) == 0
    plan = PRESETS["h200"]["cpu"]
    i, r, elem = plan.shape.in_f, plan.shape.r, 2
    records = json.loads(json_path.read_text())["records"]
    for row in records:
        if row["case"] == "decode_stack":
            call_ms = ["base", "peft", "vera_ext", "mixed layer", "mixed op"].index(row["implementation"]) + 1
            assert row["median_ms"] == call_ms / plan.layers and row["spread_ms"] == 0.5 / plan.layers
            n = row["shape"]["N"]
            adapter = 0 if row["implementation"] == "base" else 2 * n * r * 2 * i
            assert row["flops"] == 2 * n * i * i + adapter
            assert row["bytes"] >= elem * (2 * n * i + i * i)  # x, W, y at least
        else:
            call_ms = ["fp32 mm", "vera_ext op", "vera_ext", "peft"].index(row["implementation"]) + 1
            assert (row["median_ms"], row["floor_ms"]) == (call_ms, 1.0)


def test_a_failed_section_is_recorded_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    def broken(stack):
        raise RuntimeError("merge broke")

    monkeypatch.setattr(cli, "time_interleaved", _calls_once)
    monkeypatch.setattr(preset, "merge_case", broken)
    json_path, log_path = tmp_path / "plan.json", tmp_path / "plan.log"
    assert (
        cli.main(DRY_RUN + ["--case", "train_fwd,merge_stack", "--json", str(json_path), "--log", str(log_path)]) == 1
    )
    doc = json.loads(json_path.read_text())
    assert doc["errors"].keys() == {"merge"} and "RuntimeError: merge broke" in doc["errors"]["merge"]
    assert {r["case"] for r in doc["records"]} == {"train_fwd"}
    log = log_path.read_text()
    assert "[training] done in" in log and "[merge] FAILED" in log and "SECTION FAILED: merge" in log


def test_targets_and_launch_overheads_come_from_the_records():
    plan = PRESETS["h200"]["cuda"]

    def group(case, times, n=None, floor=None):
        rows = [
            Result(case, {"N": n} if n else {}, "bfloat16", "cuda", impl, ms, 0.0, floor_ms=floor)
            for impl, ms in times.items()
        ]
        set_ratios(rows)
        return rows

    results = group("train_fwd_bwd", {"base": 10.0, "peft": 30.0}) + group(
        "train_fwd_bwd", {"vera_ext": 15.0}, floor=14.0
    )
    results[-1].ratio_to_peft = 0.5
    for n in plan.decode_ns:
        results += group("decode_stack", {"base": 0.012, "mixed op": 0.015}, n)
        results += group("decode_stack_graph", {"base": 0.010, "mixed op": 0.0112}, n)
    results += group("merge_stack", {"fp32 mm": 0.1, "vera_ext op": 0.11, "vera_ext": 0.13}, floor=0.1)
    found = {t["target"]: t for t in PresetRun(plan, "cuda", PRESET_CASES, plan.rounds).finish(results)}
    eager = [r for r in results if r.case == "decode_stack"]
    assert [round(r.extra["launch_overhead_ms"], 6) for r in eager[:2]] == [0.002, 0.0038]
    assert len(overhead_lines(results)) == len(plan.decode_ns)
    want = {
        "train fwd+bwd: PEFT time / vera_ext time": (2.0, True),
        "train fwd+bwd: vera_ext / floor": (15 / 14, True),
        "merge: vera_ext op / fp32 mm of the same shape": (1.1, True),
        "merge: VeraLinear.merge() / fp32 mm (info)": (1.3, False),
    }
    for n in plan.decode_ns:
        want[f"decode N={n}, 1000 adapters, graph: mixed op / base alone"] = (1.12, True)
        want[
            f"decode N={n}, 1000 adapters, eager: mixed op / base alone (info: the target applies to graph replay)"
        ] = (1.25, False)
    assert found.keys() == want.keys()
    for name, (value, met) in want.items():
        assert found[name]["value"] == pytest.approx(value) and found[name]["met"] == met, name
    lines = target_lines(list(found.values()))
    assert lines[0] == "TARGET MET    train fwd+bwd: PEFT time / vera_ext time: 2.000 (want >= 1.5)"
    assert sum(line.startswith("TARGET MISSED ") for line in lines) == 1 + len(plan.decode_ns)


@pytest.mark.cuda
def test_h200_plan_decode_stack_and_graphs_on_the_gpu(capsys, tmp_path):
    json_path = tmp_path / "plan.json"
    assert (
        cli.main(
            [
                "--device",
                "cuda",
                "--preset",
                "h200",
                "--no-progress",
                "--rounds",
                "3",
                "--json",
                str(json_path),
                "--case",
                "decode_stack,decode_stack_graph,merge_stack",
            ]
        )
        == 0
    )
    doc = json.loads(json_path.read_text())
    failed = doc["info"].get("graph_capture_failed", {})
    for n in PRESETS["h200"]["cuda"].decode_ns:
        graphed = {
            r["implementation"] for r in doc["records"] if r["case"] == "decode_stack_graph" and r["shape"]["N"] == n
        }
        assert graphed | set(failed.get(f"N={n}", {})) == STACK_IMPLS - {"mixed layer"}
    eager = [r for r in doc["records"] if r["case"] == "decode_stack" and r["implementation"] != "mixed layer"]
    assert all(
        "launch_overhead_ms" in r["extra"]
        for r in eager
        if r["implementation"] not in failed.get(f"N={r['shape']['N']}", {})
    )
    assert "graph_probe_mixed_layer_call" in doc["info"]


def test_serve_case_runs_alone_and_prints_its_three_parts(capsys, tmp_path):
    """--case serve (quick sizes): the adds with their memory, the mixed decode against one adapter and the base
    model, and the LoRA export against PEFT's conversion, exact; the JSON holds the same numbers."""
    out = tmp_path / "serve.json"
    assert cli.main(["--case", "serve", "--quick", "--rounds", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for fragment in ("add_adapter", "load_adapters", "mixed / single", "mixed / base", "PEFT / vera_ext"):
        assert fragment in text, fragment
    doc = json.loads(out.read_text())
    assert [a["adapters"] for a in doc["adds"]] == [16, 16, 100, 100]
    assert all(a["bank_over_lambda"] >= 1.0 for a in doc["adds"])
    assert doc["export"]["max_abs_diff"]["vera_ext"] < 1e-4


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--case", "serve,decode"], "--case serve runs alone"),
        (["--case", "serve", "--base", "nf4"], "--case serve takes only"),
        (["--case", "serve", "--device", "cuda"], "runs on the CPU only"),
    ],
)
def test_serve_case_refuses_other_options(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err
