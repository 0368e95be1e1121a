"""The emulation layer itself (tests/emulated/emu): its fp16/bf16 conversions against torch's (exhaustively where
possible), and its self-tests (tests/emulated/kernels/emu_selftest.cpp): warp shuffles and votes with every width,
dynamic shared memory, atomics, vector loads, 3-D indexing, partial warps, and the misuses it must refuse."""

import pytest
import torch

pytestmark = pytest.mark.emulated

SELFTESTS = [
    "atomics",
    "dynamic_shared",
    "indexing_3d",
    "misuse",
    "vector_loads",
    "warp_ops_width16",
    "warp_ops_width32",
    "warp_ops_width8",
]
FORMATS = {"half": torch.float16, "bf16": torch.bfloat16}


def all_values(dtype):
    """Every 16-bit pattern of dtype, as dtype."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def rounding_probes(dtype):
    """Floats that exercise rounding to dtype: every finite value, the exact midpoints between neighbours (ties
    to even), one float ulp either side of them, the overflow and underflow edges, random bit patterns."""
    v = all_values(dtype).double()
    finite = torch.sort(v[torch.isfinite(v)].unique()).values
    mid = ((finite[1:] + finite[:-1]) / 2).float()
    nudge = lambda t, d: torch.nextafter(t, torch.full_like(t, d))  # noqa: E731
    edges = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            65504.0,
            65519.996,
            65520.0,
            2.0**-24,
            2.0**-25,
            2.0**-25 * 1.0000001,
            3 * 2.0**-26,
            3.3895e38,
            3.4e38,
        ]
    )
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat(
        [
            finite.float(),
            mid,
            nudge(mid, float("inf")),
            nudge(mid, -float("inf")),
            edges,
            random_bits.view(torch.float32),
        ]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_16bit_to_float_is_exact(emu, fmt):
    values = all_values(FORMATS[fmt])
    got = emu.bits_to_float(values.view(torch.int16).to(torch.int32), fmt)
    want = values.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bitwise: -0 stays -0


@pytest.mark.parametrize("fmt", FORMATS)
def test_float_to_16bit_rounds_like_torch(emu, fmt):
    probes = rounding_probes(FORMATS[fmt])
    got = emu.float_to_bits(probes, fmt) & 0xFFFF
    want = probes.to(FORMATS[fmt]).view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.isnan(probes)
    # NaN: CUDA's canonical 0x7fff, torch's differs; both must be NaN.
    assert torch.isnan(emu.bits_to_float(got[nan], fmt)).all()
    bad = (got != want) & ~nan
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at {probes[bad][:5].tolist()}"


def test_selftest_list(emu):
    assert sorted(emu.selftest_names().split(",")) == sorted(SELFTESTS)


@pytest.mark.parametrize("name", SELFTESTS)
def test_emulation_selftest(emu, name):
    assert emu.selftest(name) == ""


def test_planted_inter_block_race_shows_under_another_block_order(emu, block_order):
    """planted_block_order_kernel: every block writes one location. Forward and reverse order leave different
    blocks' writes: how the block-order tests detect inter-block races."""
    assert emu.planted_block_order(7) == 6
    block_order("reverse", 0)
    assert emu.planted_block_order(7) == 0
    block_order("shuffle", 5)
    assert emu.planted_block_order(7) in range(7)
