"""The merge kernel (csrc/cuda/merge_kernels.cu, merge_kernel in write and check-only mode), emulated, against the
CPU merge primitive: weight += alpha * delta in fp32, rounded once, for (out, in) weights and the transposed
(in, out) fan_in_fan_out layout; bit-identical results are expected."""

import pytest
import torch

from emu_helpers import DTYPES, matrix

pytestmark = pytest.mark.emulated

# (out_f, in_f): empty either way, one element, tile-sized, ragged tiles in both directions.
SHAPES = [(0, 3), (3, 0), (1, 1), (32, 32), (33, 65), (70, 45)]


def weight_for(out_f, in_f, dtype, transposed, strided, seed=0):
    rows, cols = (in_f, out_f) if transposed else (out_f, in_f)
    return matrix(rows, cols, dtype, strided, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_merge(emu, dtype, shape, transposed, strided, alpha):
    delta = torch.randn(*shape)
    got = weight_for(*shape, dtype, transposed, strided)
    want = weight_for(*shape, dtype, transposed, strided)
    assert emu.merge(got, delta, alpha, transposed, False) == 0
    emu.cpu_merge_apply(want, delta, alpha, transposed, False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 65), (70, 45)])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_merge_check_only(emu, dtype, shape, transposed):
    """Check-only writes nothing and raises the flag exactly when the CPU's safe merge refuses."""
    w = weight_for(*shape, dtype, transposed, strided=True)
    before = w.clone()
    delta = torch.randn(*shape)
    assert emu.merge(w, delta, 1.0, transposed, True) == 0
    assert torch.equal(w, before)

    delta[shape[0] // 2, shape[1] - 1] = float("inf")
    assert emu.merge(w, delta, 1.0, transposed, True) == 1
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="safe merge refused"):
        emu.cpu_merge_apply(w.clone(), delta, 1.0, transposed, True)


@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_merge_check_only_sees_overflow_in_the_weight_dtype(emu, transposed):
    """Finite in fp32, infinite once rounded to fp16: the check looks at the value that would be stored."""
    w = torch.full((40, 40), 60000.0, dtype=torch.float16)
    delta = torch.zeros(40, 40)
    delta[39, 0] = 10000.0
    assert emu.merge(w, delta, 1.0, transposed, True) == 1
    delta[39, 0] = 1.0
    assert emu.merge(w, delta, 1.0, transposed, True) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_then_unmerge_round_trip_matches_cpu(emu, dtype):
    w = weight_for(33, 65, dtype, transposed=True, strided=False)
    cpu = w.clone()
    delta = torch.randn(33, 65)
    for alpha in (1.0, -1.0):
        emu.merge(w, delta, alpha, True, False)
        emu.cpu_merge_apply(cpu, delta, alpha, True, False)
    assert torch.equal(w, cpu)


def test_merge_refuses_more_row_tiles_than_a_grid_holds(emu):
    out_f = 65535 * 32 + 1  # 65536 tiles of 32 rows: grid.y is limited to 65535
    w, delta = torch.zeros(out_f, 1), torch.zeros(out_f, 1)
    with pytest.raises(RuntimeError, match="invalid configuration"):
        emu.merge(w, delta, 1.0, False, False)
