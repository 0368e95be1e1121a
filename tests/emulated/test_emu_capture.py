"""The CUDA build's op paths while a CUDA graph is being captured, run on the CPU: the emulated launch policy reports
a capture (set_capturing), and the profiler sees every ATen call the ops make. No op may read a value back to the
host then (a capture forbids synchronization), and the adapter-index check must still happen, on the device."""

import pytest
import torch

from emu_helpers import adapter_idx

pytestmark = pytest.mark.emulated

# ATen calls that copy a device value to the host (each synchronizes on a GPU).
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal")


@pytest.fixture
def capturing(emu):
    emu.set_capturing(True)
    yield
    emu.set_capturing(False)


def mixed_case(rows=40, num_adapters=3, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_f, out_f, r = 24, 20, 8
    x, weight = torch.randn(rows, in_f, generator=g).to(dtype), torch.randn(out_f, in_f, generator=g).to(dtype)
    A, B = torch.randn(r, in_f, generator=g).to(dtype), torch.randn(out_f, r, generator=g).to(dtype)
    ld, lb = torch.randn(num_adapters, r, generator=g), torch.randn(num_adapters, out_f, generator=g)
    return x, weight, A, B, ld, lb, adapter_idx(rows, num_adapters, seed=seed)


def _inside(event, name):
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def host_reads(fn):
    """The host reads fn's ops make, except inside aten::_assert_async: on a GPU that op only launches a kernel;
    its CPU implementation (what the emulation runs) has to read its flag."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name in HOST_READS and not _inside(e, "aten::_assert_async")})


def test_the_device_check_runs_during_capture(emu, capturing):
    x, weight, A, B, ld, lb, idx = mixed_case()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, idx)
    assert "aten::_assert_async" in {e.name for e in prof.events()}


@pytest.mark.parametrize("rows", [40, 3])  # the GEMM path and the fused decode path
def test_forward_and_backward_read_nothing_back_during_capture(emu, rows):
    x, weight, A, B, ld, lb, idx = mixed_case(rows)
    g = torch.randn(rows, B.shape[0]).to(x.dtype)

    def step():
        y, u = emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, idx)
        emu.op_vera_backward(g, u, A, B, ld, lb, idx, weight, [True, True, True])

    # the control: outside a capture the index range is read back once per op
    assert "aten::_local_scalar_dense" in host_reads(step)
    emu.set_capturing(True)
    try:
        assert host_reads(step) == []
    finally:
        emu.set_capturing(False)


def test_the_decode_path_reads_nothing_back_even_outside_capture(emu):
    """At N <= 32 the decode kernels check adapter_idx on the device: no host read, captured or not (a decode step
    cannot afford a synchronization)."""
    x, weight, A, B, ld, lb, idx = mixed_case(rows=16)

    def forward():
        emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, idx)
        emu.op_vera_forward(x, torch.zeros(x.shape[0], B.shape[0], dtype=x.dtype), A, B, ld, lb, idx)

    assert host_reads(forward) == []


def test_out_of_range_index_is_still_refused_during_capture(emu, capturing):
    x, weight, A, B, ld, lb, idx = mixed_case()
    bad = idx.clone()
    bad[7] = ld.shape[0]  # one past the last adapter
    # On the CPU the device-side assert fires at once; on a GPU it stops the stream before any kernel reads lambda.
    with pytest.raises(RuntimeError, match="adapter_idx holds a value outside"):
        emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, bad)
    bad[7] = -2
    with pytest.raises(RuntimeError, match="adapter_idx holds a value outside"):
        emu.op_vera_forward(x, torch.zeros(x.shape[0], B.shape[0], dtype=x.dtype), A, B, ld, lb, bad)


def test_valid_indices_give_the_same_results_during_capture(emu):
    x, weight, A, B, ld, lb, idx = mixed_case()
    want = emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, idx)
    emu.set_capturing(True)
    try:
        got = emu.op_vera_linear_forward(x, weight, None, A, B, ld, lb, idx)
    finally:
        emu.set_capturing(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
