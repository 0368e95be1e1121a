"""The memory-traffic trace of the emulated build (tests/emulated/emu/emu_trace.h), which the kernel cost report
(benchmarks/kernel_report.py) is built on: hand-counted requests and sectors, planted waste caught, block
sampling scaled back to the full count, warp instructions told apart by barrier epochs, and results unchanged."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from kernel_cost import traffic  # noqa: E402

pytestmark = pytest.mark.emulated


def traced(emu, fn, max_blocks=0):
    emu.trace_start(max_blocks)
    try:
        out = fn()
    finally:
        launches = json.loads(emu.trace_stop())
    return out, launches


def matrix(rows, cols):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


def test_coalesced_copy_matches_a_hand_count(emu):
    x = matrix(64, 256)  # 16384 floats, 64 blocks of 256 threads
    out, [launch] = traced(emu, lambda: emu.planted_traffic("coalesced_copy", x))
    assert torch.equal(out, x)
    assert launch["kernel"].endswith("planted_coalesced_copy_kernel")
    assert launch["grid"] == [64, 1, 1] and launch["block"] == [256, 1, 1]
    for kind in ("load", "store"):
        c = launch[kind]
        # a warp request per 32 floats; 128 contiguous bytes = 4 sectors
        assert c["requests"] == 16384 // 32 and c["sectors"] == 4 * c["requests"] and c["lane_bytes"] == 65536
        assert c["requests_by_width"] == {"4": 512}
    assert launch["unique_read_bytes_private"] == 65536 and launch["unique_write_bytes_private"] == 65536
    assert launch["unique_read_bytes_shared"] == 0 and launch["block_unique_sectors"] == {"load": 2048, "store": 2048}


def test_strided_reads_show_more_sectors_per_request(emu):
    x = matrix(64, 256)
    _, [plain] = traced(emu, lambda: emu.planted_traffic("coalesced_copy", x))
    out, [strided] = traced(emu, lambda: emu.planted_traffic("strided_copy", x))
    assert torch.equal(out, x)
    ratio = traffic.sectors_per_request(strided["load"]) / traffic.sectors_per_request(plain["load"])
    assert ratio >= 4, f"strided reads: {ratio:.1f}x the sectors per request of the coalesced copy, expected >= 4x"
    # the same bytes, fetched in more pieces
    assert strided["load"]["lane_bytes"] == plain["load"]["lane_bytes"]
    assert (
        strided["unique_read_bytes_private"] + strided["unique_read_bytes_shared"] == plain["unique_read_bytes_private"]
    )


def test_double_read_shows_twice_the_ideal_read_bytes(emu):
    x = matrix(64, 256)
    out, [launch] = traced(emu, lambda: emu.planted_traffic("double_read", x))
    expected = (x.double().square().sum(1) - x.double().sum(1).square() / 256).float()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    ideal_read = x.numel() * 4
    assert launch["load"]["sectors"] * 32 >= 2 * ideal_read
    assert launch["unique_read_bytes_private"] + launch["unique_read_bytes_shared"] == ideal_read


def test_sampled_blocks_scale_to_the_full_count(emu):
    x = matrix(256, 256)  # 256 blocks
    _, [full] = traced(emu, lambda: emu.planted_traffic("coalesced_copy", x))
    _, [sampled] = traced(emu, lambda: emu.planted_traffic("coalesced_copy", x), max_blocks=16)
    assert sampled["blocks"] == 256 and sampled["executed_blocks"] == 16
    s, f = traffic.scaled(sampled), traffic.scaled(full)
    for kind in ("load", "store"):
        assert s[kind]["requests"] == full[kind]["requests"] and s[kind]["sectors"] == full[kind]["sectors"]
    assert s["unique_read_bytes"] == f["unique_read_bytes"] == x.numel() * 4


def test_one_store_of_lanes_scattered_over_rows_is_one_request_of_many_sectors(emu):
    # decode_y: after a group of output rows' warp reductions, lanes 0..n-1 each store y[m, o] of their own row m,
    # the group's rows one after another at one source line: one request of n sectors per output row (a lane's
    # successive stores there are successive requests), not n requests, nor one per group.
    n, i, o, r = 4, 64, 48, 16
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(n, i, generator=g), torch.randn(o, i, generator=g)
    a, b = torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
    ld, lb = torch.randn(r, generator=g), torch.randn(o, generator=g)
    (y, _), launches = traced(emu, lambda: emu.decode(x, w, None, None, a, b, ld, lb, None))
    decode_y = [ln for ln in launches if "decode_y_kernel" in ln["kernel"]][0]
    assert decode_y["store"]["requests"] == o
    assert decode_y["store"]["sectors"] == n * o
    y_ref, _ = emu.cpu_decode(x, w, None, None, a, b, ld, lb, None)
    torch.testing.assert_close(y, y_ref)


def test_tracing_does_not_change_results(emu):
    g = torch.Generator().manual_seed(2)
    u, lam = torch.randn(300, 40, generator=g), torch.randn(3, 40, generator=g)
    idx = torch.randint(-1, 3, (300,), generator=g)
    plain = emu.col_scale(u, lam, idx)
    out, launches = traced(emu, lambda: emu.col_scale(u, lam, idx))
    assert torch.equal(out, plain) and len(launches) == 1 and launches[0]["ok"]
    assert emu.trace_launches() == 0  # stopped: nothing is recorded any more
    emu.col_scale(u, lam, idx)
    assert emu.trace_launches() == 0


def test_kernel_names_are_the_instantiations(emu):
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    lam = torch.randn(8)
    _, launches = traced(emu, lambda: emu.row_scale(x, lam, torch.float32))
    assert launches[0]["kernel"] == "vera::cuda::{anonymous}::row_scale_kernel<__nv_bfloat16, float>"
