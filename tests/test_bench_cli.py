"""`python -m vera_ext bench`: argument handling, an end-to-end --quick run on the CPU (JSON, PNG, trace), and the
FLOP counts behind its floors checked against torch's FlopCounterMode on PEFT's VeRA layer.

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

from vera_ext import __main__ as cli
from vera_ext import bench, bench_cases
from vera_ext.bench_cases import CASES, case_cost
from vera_ext.projection import generate_projection

from vera_testing import make_peft_vera_linear

pytest.importorskip("peft")

TINY = ["--device", "cpu", "--shape", "tiny", "--quick", "--no-progress"]
REQUIRED_KEYS = {"case", "shape", "dtype", "device", "implementation", "median_ms", "spread_ms", "ratio_to_base",
                 "ratio_to_peft", "saved_bytes", "flops", "bytes", "floor_ms", "metric", "extra"}


@pytest.fixture
def no_measuring(monkeypatch):
    """Argument errors must come before any measuring."""

    def refuse(*args, **kwargs):
        raise AssertionError("measuring started although the arguments were invalid")

    monkeypatch.setattr(bench, "run_suite", refuse)


def _expect_usage_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
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
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _expect_usage_error(capsys, TINY + ["--trace", str(a_file)], "--trace", "not a directory")
    _expect_usage_error(capsys, TINY + ["--trace", str(a_file / "sub")], "--trace", "cannot create")


def test_list_names_every_case_and_public_shape(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in CASES + ("cpu-1024", "llama2-7b-qv"):
        assert name in out
    assert "tiny" not in out  # the test preset stays out of the listing


def test_defaults_follow_the_device():
    parser = bench.make_parser()
    s = bench.parse_settings(parser, parser.parse_args(["--device", "cpu"]))
    assert (s.shape.name, s.dtype, s.cases, s.rounds) == ("cpu-1024", torch.float32, CASES, 15)
    # issue 2's targets are measured at these sizes: the CPU default must not drift
    assert (s.shape.in_f, s.shape.out_f, s.shape.r, s.shape.n_train, s.shape.n_decode) == (1024, 1024, 256, 2048, 1)
    q = bench.parse_settings(parser, parser.parse_args(["--device", "cpu", "--quick", "--case", "merge,decode",
                                                         "--r", "8", "--n", "12", "--dtype", "bf16"]))
    assert q.cases == ("decode", "merge") and q.rounds == 5 and q.dtype == torch.bfloat16
    assert (q.shape.r, q.shape.n_train, q.shape.n_mixed) == (8, 12, bench.SHAPES["cpu-1024"].n_mixed_quick)


def test_quick_run_writes_consistent_json_and_a_png(capsys, tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main(TINY + ["--json", str(json_path), "--plot", str(png_path)]) == 0
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
    assert bench.main(TINY + ["--case", "train_fwd_bwd,decode_mixed,merge", "--rounds", "2",
                              "--trace", str(trace_dir)]) == 0
    out = capsys.readouterr().out
    expected_ops = {"train_fwd_bwd": {"vera_ext::vera_linear_forward", "vera_ext::vera_backward"},
                    "decode_mixed": {"vera_ext::vera_linear_forward"},
                    "merge": {"vera_ext::vera_merge_"}}
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
    assert bench.main(["--device", "cpu", "--shape", "tiny", "--quick", "--case", "merge"] + flag) == 0
    assert ("vera_ext bench:" in terminal.getvalue()) == shown
    assert "vera_ext bench:" not in capsys.readouterr().out.split("\n", 1)[1]  # stdout: the table's header only


@pytest.mark.cuda
def test_cuda_quick_run_times_with_events_and_traces_kernels(capsys, tmp_path):
    json_path, trace_dir = tmp_path / "cuda.json", tmp_path / "traces"
    assert bench.main(["--device", "cuda", "--shape", "tiny", "--quick", "--no-progress", "--case", "train_fwd,decode",
                       "--json", str(json_path), "--trace", str(trace_dir)]) == 0
    records = json.loads(json_path.read_text())
    assert {(r["device"], r["dtype"]) for r in records} == {("cuda", "bfloat16")}
    assert all(r["median_ms"] > 0 for r in records)
    trace = json.loads((trace_dir / "decode.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert any(e.get("cat") == "kernel" for e in events)  # GPU activity recorded, not only CPU ops
    assert "vera_ext::vera_linear_forward" in {e.get("name") for e in events}


def test_interleaved_samples_settle_first_and_cold_calls_follow_their_setup():
    from vera_ext.bench_timing import time_interleaved

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

    monkeypatch.setattr(bench, "time_interleaved", fake_timing)
    monkeypatch.setitem(bench_cases.EVICT_MIB, "cpu", 1)
    assert bench.main(TINY + ["--case", "decode,decode_cold"]) == 0
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
    for layer, adapter in ([(peft, True)] if case == "merge" else [(base, False), (peft, True)]):
        with FlopCounterMode(display=False) as counter:
            run(layer, adapter)
        assert case_cost(case, shape, adapter, 4)[0] == counter.get_total_flops(), (case, adapter)


def test_module_entry_dispatches_commands(capsys, monkeypatch):
    assert cli.main([]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--rounds", "0"])
    assert info.value.code == 2
    seen = []
    demo = types.ModuleType("vera_ext.demo")
    demo.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "vera_ext.demo", demo)
    monkeypatch.setattr("vera_ext.demo", demo, raising=False)
    assert cli.main(["demo", "--steps", "3"]) == 0 and seen == [["--steps", "3"]]


@pytest.mark.slow
def test_python_dash_m_runs_as_a_program(tmp_path):
    """The real entry point in a fresh interpreter (slow: importing torch and peft takes seconds)."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "vera_ext", "bench"] + TINY + ["--case", "decode", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
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
    monkeypatch.setitem(bench_cases.SHAPES, "cpu-1024", bench_cases.SHAPES["tiny"])
    monkeypatch.setitem(bench_cases.EVICT_MIB, "cpu", 1)
    assert script.main(["--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for what in ("train fwd+bwd time", "saved activations", "decode N=1 forward", "caches evicted"):
        assert what in out, what
