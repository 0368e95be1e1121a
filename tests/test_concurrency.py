"""Inference from several Python threads on one model equals sequential calls, bit for bit.

Our CPU kernels sum in a fixed order whatever the thread count, and a model in eval mode under inference_mode holds
no per-call state, so threads running forwards at once (each with at::parallel_for regions of its own) must give
exactly what the same calls give one after another. A deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import threading

import torch

from vera_ext import VeraLinear, VeraProjection
from vera_ext.config import VeraConfig

from vera_models import ours, randomize_lambdas

THREADS = 4
CALLS_PER_THREAD = 12
TIMEOUT_S = 120


def _model(dtype=torch.float32):
    """An MLP with three adapters (of different ranks) on every Linear; widths large enough that the CPU loops
    split their work across threads (at::parallel_for) at the row counts used."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 160), torch.nn.ReLU(), torch.nn.Linear(160, 128), torch.nn.ReLU(), torch.nn.Linear(128, 24)
    ).to(dtype)
    targets = ["0", "2", "4"]
    vm = ours(model, r=64, target_modules=targets, init_weights=False)
    vm.add_adapter("b", VeraConfig(r=64, target_modules=targets, init_weights=False))
    vm.add_adapter("c", VeraConfig(r=32, target_modules=["0", "4"], init_weights=False))
    randomize_lambdas(vm)
    return vm.eval()


def _jobs(seed: int, mixed: bool, dtype):
    """Per thread, a list of (x, adapter_names): row counts on both sides of the decode (N <= 16) and the
    N < r / N >= r sizes."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for t in range(THREADS):
        calls = []
        for c in range(CALLS_PER_THREAD):
            n = [1, 3, 16, 17, 40, 150][(t + c) % 6]
            x = torch.randn(n, 96, generator=g).to(dtype)
            names = None
            if mixed:
                choice = torch.randint(0, 4, (n,), generator=g).tolist()
                names = [["default", "b", "c", "__base__"][k] for k in choice]
            calls.append((x, names))
        jobs.append(calls)
    return jobs


class LayerStack(torch.nn.Module):
    """The same widths as :func:`_model`, built from VeraLinear layers sharing one projection and called with
    ``adapter_names`` directly (no model-level hooks)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        widths = [96, 160, 128, 24]
        proj = VeraProjection.from_key(64, max(widths[:-1]), max(widths[1:]))
        self.layers = torch.nn.ModuleList()
        for i, o in zip(widths[:-1], widths[1:]):
            layer = VeraLinear(torch.nn.Linear(i, o).to(dtype), 64, projection=proj, init_weights=False)
            layer.update_layer("b", 64, init_weights=False)
            layer.update_layer("c", 32, init_weights=False)
            self.layers.append(layer)
        randomize_lambdas(self)
        self.eval()

    def forward(self, x, adapter_names=None):
        for k, layer in enumerate(self.layers):
            x = layer(x, adapter_names=adapter_names)
            x = torch.relu(x) if k + 1 < len(self.layers) else x
        return x


def _run(vm, x, names):
    with torch.inference_mode():
        return vm(x) if names is None else vm(x, adapter_names=names)


def _run_threads(vm, jobs):
    """Every thread's results, the threads started together; fails on an exception or a hang."""
    results = [[None] * len(calls) for calls in jobs]
    errors = []
    start = threading.Barrier(len(jobs))

    def work(t):
        try:
            start.wait()
            for c, (x, names) in enumerate(jobs[t]):
                results[t][c] = _run(vm, x, names)
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    # daemon threads: a deadlocked one cannot keep the test process alive
    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT_S)
    assert not any(th.is_alive() for th in threads), f"threads still running after {TIMEOUT_S} s: deadlock?"
    assert not errors, errors[0]
    return results


def _assert_threads_match_sequential(vm, jobs):
    sequential = [[_run(vm, x, names) for x, names in calls] for calls in jobs]
    for attempt in range(2):
        threaded = _run_threads(vm, jobs)
        for t, calls in enumerate(jobs):
            for c in range(len(calls)):
                assert torch.equal(threaded[t][c], sequential[t][c]), f"thread {t} call {c} (attempt {attempt})"


def test_threads_equal_sequential_calls():
    vm = _model()
    vm.set_adapter("b")
    _assert_threads_match_sequential(vm, _jobs(1, False, torch.float32))


def test_threads_equal_sequential_mixed_batches_on_layers():
    stack = LayerStack()
    _assert_threads_match_sequential(stack, _jobs(4, True, torch.float32))


def test_threads_equal_sequential_calls_merged():
    vm = _model()
    vm.set_adapter("default")
    vm.merge_adapter()
    _assert_threads_match_sequential(vm, _jobs(2, False, torch.float32))


def test_threads_fill_the_projection_cache_consistently():
    """A bf16 stack on an fp32 projection: the first forwards cast and slice the shared projection (cached).
    Threads that race to fill the cache must all get what a sequential run on a fresh twin gets."""
    jobs = _jobs(3, True, torch.bfloat16)
    reference = LayerStack(torch.bfloat16)
    sequential = [[_run(reference, x, names) for x, names in calls] for calls in jobs]
    racing = LayerStack(torch.bfloat16)  # its cache is empty: the threads fill it
    threaded = _run_threads(racing, jobs)
    for t, calls in enumerate(jobs):
        for c in range(len(calls)):
            assert torch.equal(threaded[t][c], sequential[t][c]), f"thread {t} call {c}"


def test_concurrent_mixed_batches_keep_their_own_adapter_names():
    """Deterministic interleaving: thread A is inside its forward (its names handed out) when thread B enters
    its own; A then finishes while B waits. A must still compute with A's names."""
    vm = _model()
    x_a, names_a = torch.randn(3, 96), ["b", "__base__", "c"]
    x_b, names_b = torch.randn(2, 96), ["default", "default"]
    expected = _run(vm, x_a, names_a)

    a_inside, b_inside, release_a, release_b = (threading.Event() for _ in range(4))
    gate = {}  # thread -> (event to signal on entry, event to wait for)

    def pause(module, args):
        signal, wait = gate.get(threading.get_ident(), (None, None))
        if signal is not None:
            gate.pop(threading.get_ident())
            signal.set()
            assert wait.wait(TIMEOUT_S)

    first = vm.model[0]
    handle = first.register_forward_pre_hook(pause, prepend=True)
    out = {}

    def call(key, x, names, signal, wait):
        gate[threading.get_ident()] = (signal, wait)
        try:
            out[key] = _run(vm, x, names)
        except BaseException as err:
            out[key] = err

    try:
        ta = threading.Thread(target=call, args=("a", x_a, names_a, a_inside, release_a), daemon=True)
        tb = threading.Thread(target=call, args=("b", x_b, names_b, b_inside, release_b), daemon=True)
        ta.start()
        assert a_inside.wait(TIMEOUT_S)
        tb.start()
        assert b_inside.wait(TIMEOUT_S)
        release_a.set()
        ta.join(TIMEOUT_S)
        release_b.set()
        tb.join(TIMEOUT_S)
    finally:
        handle.remove()
    assert not ta.is_alive() and not tb.is_alive(), "deadlock"
    assert not isinstance(out["a"], BaseException), out["a"]
    assert torch.equal(out["a"], expected)
