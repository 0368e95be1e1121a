"""benchmarks/kernel_report.py at reduced shapes: its JSON has one record per compiled kernel instantiation with
the binary's resources (equal to what cuobjdump prints), every op case with traced bytes at least its ideal bytes
and positive, finite predictions. Needs the CUDA part of the build (sm_90 cubins; no GPU) and the emulated build."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from kernel_cost import binary, cases, h200, model  # noqa: E402

pytestmark = pytest.mark.emulated


def _binary_or_skip():
    try:
        path, tool = binary.extension_binary(), binary.find_cuobjdump()
        binary.resource_usage(path, tool)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"no CUDA binary to read: {e}")
    return path, tool


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _binary_or_skip()
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "kernel_report.py"),
            "--small",
            "--max-blocks",
            "16",
            "--json",
            str(out),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def test_one_record_per_compiled_kernel_with_cuobjdumps_registers(report):
    path, tool = _binary_or_skip()
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    printed = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(m[0] for m in printed), capture_output=True, text=True, check=True
    ).stdout.split("\n")
    expected = {binary.kernel_key(d): int(m[1]) for d, m in zip(demangled, printed)}
    got = {k["key"]: k for k in report["kernels"]}
    assert set(got) == set(expected)
    for key, regs in expected.items():
        assert got[key]["registers"] == regs > 0, key
        assert isinstance(got[key]["spills"], bool)
        assert got[key]["traced"]["launches"] >= 1, f"{key}: no case launches it (cases.py must cover every kernel)"
        # the access helpers keep the 16-byte loads (in the decode kernels' 16-byte instantiations, kAligned = true)
        if key.startswith(("decode_u_kernel", "decode_y_kernel")) and key.endswith(", true>"):
            assert got[key]["ldg128"] > 0, f"{key}: no LDG.E.128 in its SASS"


def test_every_case_traced_and_predicted(report):
    names = [op["case"] for op in report["ops"]]
    assert names == [c.name for c in cases.select("all", small=True, dtypes=("bf16", "fp16", "fp32"))]
    for op in report["ops"]:
        assert op["dram_bytes"] >= op["ideal_read_bytes"] + op["ideal_write_bytes"], op["case"]
        assert math.isfinite(op["predicted_us"]) and op["predicted_us"] > 0, op["case"]
        assert math.isfinite(op["floor_us"]) and op["floor_us"] > 0, op["case"]
        assert op["our_kernels"]["launches"] >= 1, op["case"]
        for ev in op["events"]:
            assert math.isfinite(ev["predicted_us"]) and ev["predicted_us"] > 0, (op["case"], ev)
            if ev["kind"] == "kernel":
                assert ev["key"] in {k["key"] for k in report["kernels"]}
                assert ev["sector_bytes"]["read"] >= ev["unique_bytes"]["read"] > 0, (op["case"], ev["key"])


def test_gpu_constants_are_recorded_with_sources(report):
    assert set(report["gpu"]) == set(h200.SOURCES)
    assert all(v["source"] for v in report["gpu"].values())


def _launch(**overrides):
    """A synthetic traced launch: 132 blocks of 256 threads, 1 MiB read once coalesced, 1 MiB written."""
    counts = {"requests": 8192, "sectors": 32768, "lane_bytes": 2**20, "requests_by_width": {"4": 8192}}
    ev = {
        "kind": "kernel",
        "kernel": "vera::cuda::{anonymous}::row_scale_kernel<float, float>",
        "grid": [132, 1, 1],
        "block": [256, 1, 1],
        "dynamic_shared_bytes": 0,
        "blocks": 132,
        "executed_blocks": 132,
        "ok": True,
        "load": dict(counts),
        "store": dict(counts),
        "atomic": {"requests": 0, "sectors": 0, "lane_bytes": 0, "requests_by_width": {}},
        "unique_read_bytes_private": 2**20,
        "unique_read_bytes_shared": 0,
        "unique_write_bytes_private": 2**20,
        "unique_write_bytes_shared": 0,
        "block_unique_sectors": {"load": 32768, "store": 32768},
    }
    ev.update(overrides)
    return ev


def test_model_takes_the_largest_term_and_scales_samples():
    case = cases.Case("t", "training", "t", "forward", 1024, 256, 256, 16, dtype=__import__("torch").float32)
    fact = {"registers": 32, "static_shared_bytes": 0, "load_batches": {"bytes_in_flight_per_warp": 2048.0}}
    facts = {"row_scale_kernel<float, float>": fact}
    rec = model.predict_kernel(_launch(), case, facts, h200.H200)
    assert rec["terms_us"]["dram"] == pytest.approx(2 * 2**20 / h200.H200.hbm_bytes_per_s * 1e6)
    assert rec["predicted_us"] == pytest.approx(max(rec["terms_us"].values()) + h200.H200.kernel_overhead_us)
    # half the blocks traced: the same totals after scaling (nothing shared between blocks)
    half = _launch(
        executed_blocks=66,
        unique_read_bytes_private=2**19,
        unique_write_bytes_private=2**19,
        load={**_launch()["load"], "requests": 4096, "sectors": 16384, "lane_bytes": 2**19},
        store={**_launch()["store"], "requests": 4096, "sectors": 16384, "lane_bytes": 2**19},
        block_unique_sectors={"load": 16384, "store": 16384},
    )
    scaled = model.predict_kernel(half, case, facts, h200.H200)
    assert scaled["terms_us"] == pytest.approx(rec["terms_us"])
    # four times the sectors per request (uncoalesced): the L1 term grows fourfold
    wide = _launch(load={**_launch()["load"], "sectors": 4 * 32768})
    assert model.predict_kernel(wide, case, facts, h200.H200)["sectors_per_request"]["load"] == 16
    assert model.predict_kernel(wide, case, facts, h200.H200)["terms_us"]["l1"] > rec["terms_us"]["l1"]


def test_decode_cases_are_also_judged_against_the_base_layer_alone():
    """Decode ops carry a second yardstick: the frozen layer alone, its bytes at the HBM rate plus one launch (the
    decode target is a ratio to it); other ops have none."""
    gpu = h200.H200
    case = next(c for c in cases.select("decode") if c.name == "decode_n16")
    us, what = case.base_layer_us(gpu)
    nbytes = (4096 * 4096 + 16 * (4096 + 4096)) * 2
    assert us == pytest.approx(nbytes / gpu.hbm_bytes_per_s * 1e6 + gpu.kernel_overhead_us)
    assert us > case.floor_us(gpu)[0] and "base layer" in what
    op = model.predict_case(case, [], {}, gpu)
    assert op["base_layer_us"] == us and op["ratio_to_base_layer"] == 0.0
    merge = next(c for c in cases.select("merge"))
    assert merge.base_layer_us(gpu) is None
    assert model.predict_case(merge, [], {}, gpu)["ratio_to_base_layer"] is None


def test_a_programmatic_dependent_launch_is_priced_with_the_kernel_before_it():
    """A PDL pair costs one launch overhead plus the largest of the two kernels' terms summed per resource: a
    DRAM-bound kernel after an L2-bound one overlaps it (less than the two alone), never less than either alone;
    without the programmatic mark each pays its own launch and its own largest term."""
    gpu = h200.H200
    case = next(c for c in cases.select("decode") if c.name == "decode_n1")
    first = _launch(kernel="decode_u_kernel<float, 1, true>", block_unique_sectors={"load": 4 * 32768, "store": 0})
    second = _launch(kernel="decode_y_kernel<float, 1, true>", unique_read_bytes_private=2**24)
    alone = [model.predict_kernel(ev, case, {}, gpu) for ev in (first, second)]
    plain = model.predict_case(case, [dict(first, kind="kernel"), dict(second, kind="kernel")], {}, gpu)
    assert plain["predicted_us"] == pytest.approx(sum(r["predicted_us"] for r in alone))
    paired = model.predict_case(
        case, [dict(first, kind="kernel"), dict(second, kind="kernel", programmatic=True)], {}, gpu
    )
    summed = {k: alone[0]["terms_us"][k] + alone[1]["terms_us"][k] for k in alone[0]["terms_us"]}
    assert paired["predicted_us"] == pytest.approx(max(summed.values()) + gpu.kernel_overhead_us)
    assert max(r["predicted_us"] for r in alone) <= paired["predicted_us"] < plain["predicted_us"]
    assert paired["events"][1]["group_terms_us"] == pytest.approx(summed)
    assert paired["events"][1]["alone_us"] == pytest.approx(alone[1]["predicted_us"])
