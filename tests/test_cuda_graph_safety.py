"""What CUDA graphs and the CUDA build need from the ops and the layer: float64 refused up front on CUDA, the
projection's casts never cached during a capture, and a mixed-adapter step that captures and replays (the GPU half;
the no-host-read half runs on the CPU in tests/emulated/test_emu_capture.py)."""

import pytest
import torch

import vera_ext.projection as projection
from vera_ext import VeraProjection, ops
from vera_ext.config import VeraConfig

from vera_models import mlp, ours, randomize_lambdas

CPU = torch.device("cpu")


def test_projection_casts_made_during_a_capture_are_used_but_not_cached(monkeypatch):
    proj = VeraProjection.from_key(4, 8, 6)
    monkeypatch.setattr(projection, "_capturing", lambda device: True)
    A, B = proj.cast(torch.bfloat16, CPU)
    sA, sB = proj.sliced(3, 5, 6, torch.bfloat16, CPU)
    assert torch.equal(A, proj.vera_A.to(torch.bfloat16)) and torch.equal(sB, proj.vera_B[:6, :3].to(torch.bfloat16))
    assert proj.cached_tensors() == []
    monkeypatch.setattr(projection, "_capturing", lambda device: False)
    A2, _ = proj.cast(torch.bfloat16, CPU)
    assert A2 is not A and len(proj.cached_tensors()) == 2
    assert proj.cast(torch.bfloat16, CPU)[0] is A2


@pytest.mark.cuda
def test_float64_is_refused_up_front_on_cuda():
    x = torch.randn(4, 8, dtype=torch.float64, device="cuda")
    A, B = torch.randn(3, 8, dtype=torch.float64, device="cuda"), torch.randn(5, 3, dtype=torch.float64, device="cuda")
    ld, lb = torch.ones(3, dtype=torch.float64, device="cuda"), torch.ones(5, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="x may be float64 only on the CPU"):
        ops.vera_forward(x, torch.zeros(4, 5, dtype=torch.float64, device="cuda"), A, B, ld, lb)
    w = torch.randn(5, 8, dtype=torch.float64, device="cuda")
    before = w.clone()
    with pytest.raises(RuntimeError, match="float64 only on the CPU"):
        ops.vera_merge_(w, A, B, ld, lb, 1.0, False, False)
    assert torch.equal(w, before)


@pytest.mark.cuda
def test_mixed_adapter_forward_captures_and_replays():
    vm = ours(mlp(), r=6, target_modules=["lin0", "lin1"], init_weights=False)
    vm.add_adapter("b", VeraConfig(r=6, target_modules=["lin0", "lin1"], init_weights=False))
    randomize_lambdas(vm)
    vm = vm.cuda().to(torch.bfloat16)
    x = torch.randn(8, 10, device="cuda", dtype=torch.bfloat16)
    names = ["default", "b", "__base__", "b"] * 2
    with torch.no_grad():
        want = vm(x, adapter_names=names)  # warm-up outside the capture: casts cached, kernels loaded
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = vm(x, adapter_names=names)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(got, want)
