"""Every VeRA kernel gives bit-identical results whatever order the emulator runs its blocks in. On the GPU blocks
run concurrently in no defined order: a result that depends on the order is an inter-block race (two blocks
writing one location, a block reading another's output without synchronization)."""

import pytest
import torch

from emu_helpers import adapter_idx, matrix

pytestmark = pytest.mark.emulated


def run_row_scale(emu):
    x = matrix(37, 1000, torch.float16, strided=True)
    return [emu.row_scale(x, torch.randn(37, generator=gen()), torch.float32)]


def run_col_scale(emu):
    return [emu.col_scale(matrix(300, 130, torch.bfloat16), torch.randn(3, 130, generator=gen()), adapter_idx(300, 3))]


def run_scale_add(emu):
    out = matrix(300, 130, torch.float32, seed=1)
    emu.scale_add(
        out, out, matrix(300, 130, torch.float32, seed=2), torch.randn(3, 130, generator=gen()), adapter_idx(300, 3)
    )
    return [out]


def run_col_dot_reduce(emu):  # 4 row splits: col_dot_partial_kernel and col_dot_finish_kernel
    p, q = matrix(1000, 100, torch.float16, seed=1), matrix(1000, 100, torch.float32, seed=2)
    return [emu.col_dot_reduce(p, q, adapter_idx(1000, 4), 4)]


def run_lambda_grads(emu):  # 2 column chunks x 7 row chunks, then the finish kernel
    q, B = matrix(200, 300, torch.float32, seed=1), matrix(200, 300, torch.bfloat16, seed=2)
    return list(emu.lambda_grads(q, B, torch.randn(300, generator=gen()), torch.randn(200, generator=gen())))


def run_merge(emu):  # 3 x 2 blocks of 128x128, r past one k chunk, both layouts
    outs = []
    for transposed in (False, True):
        w = matrix(140, 300, torch.bfloat16, strided=True) if transposed else matrix(300, 140, torch.bfloat16)
        A, B = matrix(11, 140, torch.bfloat16, seed=3), matrix(300, 11, torch.bfloat16, seed=4)
        ld, lb = torch.rand(11, generator=gen()), torch.rand(300, generator=gen())
        emu.merge(w, A, B, ld, lb, 1.0, transposed, False)
        lb[299] = float("inf")
        outs += [w, torch.tensor(emu.merge(w, A, B, ld, lb, 1.0, transposed, True))]
    return outs


def run_max_abs(emu):  # several blocks and a second grid-stride step for the fp32 tensor
    ts = [matrix(300, 171, torch.float32), matrix(33, 77, torch.bfloat16, seed=2), torch.randn(9, generator=gen())]
    return [torch.tensor(emu.max_abs(ts), dtype=torch.float64)]


def run_decode(emu):
    x, W = matrix(5, 131, torch.float32, seed=1), matrix(37, 131, torch.float32, seed=4)
    A, B = matrix(24, 131, torch.float32, seed=2), matrix(37, 24, torch.float32, seed=3)
    return list(
        emu.decode(
            x,
            W,
            None,
            None,
            A,
            B,
            torch.randn(3, 24, generator=gen()),
            torch.randn(3, 37, generator=gen()),
            adapter_idx(5, 3),
        )
    )


def run_decode_aligned(emu):  # the 16-byte instantiations, several blocks of both passes, buckets 4 and 32
    outs = []
    for n in (3, 20):
        x, W = matrix(n, 256, torch.bfloat16, seed=1), matrix(200, 256, torch.bfloat16, seed=4)
        A, B = matrix(40, 256, torch.bfloat16, seed=2), matrix(200, 40, torch.bfloat16, seed=3)
        outs += emu.decode(
            x,
            W,
            matrix(1, 200, torch.bfloat16, seed=5)[0],
            None,
            A,
            B,
            torch.randn(3, 40, generator=gen()),
            torch.randn(3, 200, generator=gen()),
            adapter_idx(n, 3),
        )
    return outs


def gen():
    return torch.Generator().manual_seed(11)


RUNS = {
    f.__name__[4:]: f
    for f in (
        run_row_scale,
        run_col_scale,
        run_scale_add,
        run_col_dot_reduce,
        run_lambda_grads,
        run_merge,
        run_max_abs,
        run_decode,
        run_decode_aligned,
    )
}


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
@pytest.mark.parametrize("launcher", RUNS)
def test_results_do_not_depend_on_block_order(emu, block_order, launcher, order):
    forward = RUNS[launcher](emu)
    block_order(order, 7)
    other = RUNS[launcher](emu)
    for a, b in zip(forward, other):
        assert torch.equal(a, b), f"{launcher}: results differ between forward and {order} block order"
