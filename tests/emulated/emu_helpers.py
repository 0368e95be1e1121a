"""Inputs and comparisons shared by the emulated-kernel tests."""

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Element-wise kernels cap their grid at 4096 blocks of 256 threads: more elements than this take a second
# grid-stride pass.
ONE_GRID_PASS = 4096 * 256


def matrix(rows, cols, dtype, strided=False, seed=0):
    """A random (rows, cols) matrix; strided: a view whose row stride exceeds cols (as the projection slices
    A[:r, :I] and B[:O, :r] are)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, cols + (5 if strided else 0), generator=g).to(dtype)
    view = full[:, :cols]
    assert not strided or rows < 2 or view.stride(0) > cols
    return view


def adapter_idx(rows, num_adapters, seed=0):
    """Per-row adapter indices in [-1, num_adapters): -1 is a row without adapter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, num_adapters, (rows,), generator=g, dtype=torch.int64)


def sum_reference(terms):
    """Sums over dim 0 in float64, with the sum of magnitudes: the scale of fp32 rounding error."""
    t = terms.double()
    return t.sum(0), t.abs().sum(0)


def assert_reduction_close(got, cpu, ref, magnitude, what):
    """A fp32 reduction (summed in its own order) is within twice the CPU primitive's error against float64,
    plus a few ulps of the magnitude of its terms."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs()
    cpu_err = (cpu.double() - ref).abs().max().item()
    bound = 2 * cpu_err + 4 * torch.finfo(torch.float32).eps * magnitude
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: error {err.flatten()[worst].item():.3g} at flat index {worst.item()} exceeds "
        f"{bound.flatten()[worst].item():.3g} (CPU primitive's max error {cpu_err:.3g})"
    )
