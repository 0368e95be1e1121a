"""Cases on a stack of layers that share one projection, as inside a model (the ``h200`` preset's decode and merge).

A model adapts many layers with one VeRA projection. In decode each layer's weight streams from memory while the
shared A and B stay in cache (the L2 on a GPU), so one layer called in a loop, whose weight stays in cache too,
misjudges the cost. These cases run L distinct layers (I = O, chained) and report times **per layer**:

- ``decode_stack``: N rows through the stack, eager. Implementations: ``base`` (the nn.Linear layers alone),
  ``peft`` (PEFT's VeRA, one adapter), ``vera_ext`` (VeraLinear, one adapter), ``mixed layer``
  (``VeraLinear(x, adapter_names=...)``, each row a different adapter of the K registered on every layer) and
  ``mixed op`` (``ops.vera_linear_forward`` with stacked (K, r) and (K, O) lambda tables and a device index vector:
  what a serving loop or a captured graph calls). PEFT cannot mix adapters in a batch: its row is one adapter.
- ``decode_stack_graph``: the same calls replayed from CUDA graphs captured on static inputs (CUDA only); eager
  minus graph is the host's launch overhead. ``mixed layer`` is left out: it turns adapter names into row indices
  on the host on every call, which a graph cannot hold (``graph_probe`` records whether its capture even works).
- ``merge_stack``: each call merges or unmerges the next layer of the stack in turn (half the calls merge, half
  unmerge), for the op (``ops.vera_merge_``, on the mixed stack's weights), ``vera_ext`` (``VeraLinear.merge()``)
  and ``peft`` (PEFT's ``merge()``), next to ``fp32 mm``: one fp32 ``torch.mm`` of (O x r) @ (r x I), the GEMM
  every merge contains, whose measured time is the case's floor.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..layer import VeraLinear
from ..projection import VeraProjection
from .cases import Case, rel_diff

STACK_CASES = ("decode_stack", "decode_stack_graph", "merge_stack")
STACK_CASE_HELP = {
    "decode_stack": "N rows through L layers sharing one projection, per layer; one adapter and K mixed",
    "decode_stack_graph": "decode_stack replayed from CUDA graphs (CUDA only; eager - graph = launch overhead)",
    "merge_stack": "merge or unmerge of the next layer in turn, vs the fp32 mm every merge contains",
}


class Stack:
    """``count`` layers ``dim -> dim``: distinct frozen base weights (no bias, like a transformer's projections)
    and, over copies of them, three adapted stacks, each with one projection shared by its layers:

    - ``peft``: PEFT's VeRA, built as a user builds it (``get_peft_model`` on an ``nn.Sequential`` of the bases,
      its defaults, so a low-precision model keeps its adapter in fp32); ``init_weights=False`` so that
      lambda_b != 0. None without peft.
    - ``ours``: VeraLinear with PEFT's projection and lambdas (the same function), one adapter.
    - ``mixed``: VeraLinear with ``adapters`` adapters per layer (``default`` then ``a1``, ``a2``, ...), and
      ``tables``: per layer, its lambdas stacked, ((K, r), (K, O)) fp32, for the op call; ``proj_A`` (r, I) and
      ``proj_B`` (O, r): the projection's slices in ``dtype``, as the layers use them.
    """

    def __init__(self, dim: int, r: int, count: int, adapters: int, dtype: torch.dtype, device: str, seed: int = 0):
        self.dim, self.r, self.count, self.dtype, self.device = dim, r, count, dtype, device
        torch.manual_seed(seed)
        self.base = [
            nn.Linear(dim, dim, bias=False, device=device, dtype=dtype).requires_grad_(False) for _ in range(count)
        ]
        self.names = ["default"] + [f"a{i}" for i in range(1, adapters)]
        self.peft = None
        try:
            from peft import VeraConfig, get_peft_model
        except ImportError:

            def projection():
                return VeraProjection.from_key(r, dim, dim, prng_key=seed).to(device)
        else:
            holder = nn.Sequential(*[copy.deepcopy(b) for b in self.base])
            config = VeraConfig(
                r=r, target_modules=[str(i) for i in range(count)], init_weights=False, projection_prng_key=seed
            )
            model = get_peft_model(holder, config)
            self.peft = [model.base_model.model[i] for i in range(count)]

            def projection():  # PEFT's stored draw, in fp32 as VeraLinear keeps it
                first = self.peft[0]
                return VeraProjection(*(t["default"].detach().float().clone() for t in (first.vera_A, first.vera_B)))

        self.ours = self._vera_ext(projection())
        self.mixed = self._vera_ext(projection())
        for layer in self.mixed:
            for name in self.names[1:]:
                layer.add_adapter(name, r, init_weights=False)
        self.tables = [
            (
                torch.stack([m.vera_lambda_d[n] for n in self.names]).detach(),
                torch.stack([m.vera_lambda_b[n] for n in self.names]).detach(),
            )
            for m in self.mixed
        ]
        self.proj_A, self.proj_B = self.mixed[0].vera_projection.sliced(r, dim, dim, dtype, torch.device(device))
        for layer in self.base + (self.peft or []) + self.ours + self.mixed:
            layer.eval()

    def _vera_ext(self, projection: VeraProjection) -> list[VeraLinear]:
        layers = []
        for i, base in enumerate(self.base):
            layer = VeraLinear(copy.deepcopy(base), self.r, projection=projection, init_weights=False)
            if self.peft is not None:
                with torch.no_grad():
                    layer.vera_lambda_d["default"].copy_(self.peft[i].vera_lambda_d["default"])
                    layer.vera_lambda_b["default"].copy_(self.peft[i].vera_lambda_b["default"])
            layers.append(layer)
        return layers

    @property
    def adapters(self) -> int:
        return len(self.names)

    def shape(self, n: int) -> dict:
        return {"N": n, "I": self.dim, "O": self.dim, "r": self.r, "M": self.adapters, "L": self.count}


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` (on its static inputs) in a CUDA graph after a warm-up on a side stream; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def _decode_costs(stack: Stack, n: int) -> dict[str, tuple[int, int]]:
    """(FLOPs, bytes) per layer of each decode implementation: x read, W read, y written; the adapters add the
    projection (read once per pass through the stack, so 1/L of it per layer: it stays in cache across layers), the
    lambdas their rows use, and for the mixed calls the row -> adapter index."""
    i = o = stack.dim
    r, elem = stack.r, stack.dtype.itemsize
    flops, moved = 2 * n * i * o, elem * (n * i + i * o + n * o)
    adapter_flops, proj, lam = 2 * n * r * (i + o), elem * r * (i + o) // stack.count, 4 * (r + o)
    one = (flops + adapter_flops, moved + proj + lam)
    mixed = (flops + adapter_flops, moved + proj + min(n, stack.adapters) * lam + 8 * n)
    return {"base": (flops, moved), "peft": one, "vera_ext": one, "mixed layer": mixed, "mixed op": mixed}


def decode_cases(stack: Stack, n: int, eager: bool, graphs: bool, info: dict) -> list[Case]:
    """``decode_stack`` (with ``eager``) and ``decode_stack_graph`` (with ``graphs``; CUDA only) at N = n rows, each
    row on a different adapter for the mixed calls (n <= K). Capture failures are recorded in ``info``."""
    dim, dev = stack.dim, stack.device
    x = torch.randn(n, dim, device=dev, dtype=stack.dtype)
    picks = torch.randperm(stack.adapters, generator=torch.Generator().manual_seed(n))[:n]
    idx = picks.to(dev)
    row_names = [stack.names[i] for i in picks.tolist()]

    def chain(layers, **kwargs):
        def run():
            y = x
            for layer in layers:
                y = layer(y, **kwargs)
            return y

        return run

    def chain_op():
        def run():
            y = x
            for layer, (ld, lb) in zip(stack.mixed, stack.tables):
                y = ops.vera_linear_forward(y, layer.base_layer.weight, None, stack.proj_A, stack.proj_B, ld, lb, idx)
            return y

        return run

    fns = {"base": chain(stack.base)}
    if stack.peft is not None:
        fns["peft"] = chain(stack.peft)
    fns.update(
        {
            "vera_ext": chain(stack.ours),
            "mixed layer": chain(stack.mixed, adapter_names=row_names),
            "mixed op": chain_op(),
        }
    )
    costs = _decode_costs(stack, n)
    with torch.inference_mode():
        out = {k: fn() for k, fn in fns.items()}
    extra = {"mixed op": {"rel_diff_vs_mixed_layer": rel_diff(out["mixed op"], out["mixed layer"])}}
    if "peft" in out:
        extra["vera_ext"] = {"rel_diff_vs_peft_output": rel_diff(out["vera_ext"], out["peft"])}
    cases = []
    common = dict(shape=stack.shape(n), grad=False, per_call=stack.count, costs=costs)
    if eager:
        cases.append(Case("decode_stack", fns=fns, extra=extra, **common))
    if graphs:
        replays, failed = {}, {}
        with torch.inference_mode():
            for k, fn in fns.items():
                if k == "mixed layer":
                    continue
                try:
                    replays[k] = cuda_graph(fn)
                except Exception as err:  # recorded: one implementation's capture must not end the run
                    failed[k] = _why(err)
        if failed:
            info.setdefault("graph_capture_failed", {})[f"N={n}"] = failed
        if replays:
            cases.append(Case("decode_stack_graph", fns=replays, **common))
    return cases


def merge_case(stack: Stack) -> Case:
    """``merge_stack``: merge/unmerge of the stack's layers in turn (``stack.ours``, ``stack.peft``; the op on
    ``stack.mixed``'s weights, which no other case of the run reads afterwards), vs the fp32 GEMM of the same shape.
    Leaves ``ours`` and ``peft`` merged or not, depending on the number of calls."""
    dim, r = stack.dim, stack.r
    proj = stack.ours[0].vera_projection  # fp32, as VeraLinear keeps it; merge reads it in place
    A, B = proj.vera_A[:r, :dim], proj.vera_B[:dim, :r]
    ld, lb = (t.detach() for t in (stack.ours[0].vera_lambda_d["default"], stack.ours[0].vera_lambda_b["default"]))
    b_hat, a_hat = (B * lb[:, None]).contiguous(), (A * ld[:, None]).contiguous()

    def in_turn(layers):
        turn = [0]

        def run():
            layer = layers[turn[0] % len(layers)]
            turn[0] += 1
            layer.unmerge() if layer.merged else layer.merge()

        return run

    def op_in_turn():  # +1 on one pass over the stack, -1 on the next
        turn = [0]

        def run():
            i = turn[0]
            turn[0] += 1
            sign = 1.0 if (i // stack.count) % 2 == 0 else -1.0
            ops.vera_merge_(stack.mixed[i % stack.count].base_layer.weight.data, A, B, ld, lb, sign, False, False)

        return run

    fns = {"fp32 mm": lambda: torch.mm(b_hat, a_hat), "vera_ext op": op_in_turn(), "vera_ext": in_turn(stack.ours)}
    if stack.peft is not None:
        fns["peft"] = in_turn(stack.peft)
    elem, gemm = stack.dtype.itemsize, 2 * dim * r * dim
    one = (gemm, 2 * elem * dim * dim + 4 * r * 2 * dim + 4 * (r + dim))  # W read and written, A, B, lambdas
    costs = {"fp32 mm": (gemm, 4 * (2 * dim * r + dim * dim)), "vera_ext op": one, "vera_ext": one, "peft": one}
    return Case("merge_stack", {"I": dim, "O": dim, "r": r, "L": stack.count}, fns, costs=costs, floor_impl="fp32 mm")


def graph_probe(stack: Stack) -> str:
    """Whether a user can capture VeraLinear's mixed-batch call (``adapter_names``) in a CUDA graph: "captured" or
    why not. Run last: a failed capture is harmless, but nothing should depend on the CUDA context after it."""
    layer = stack.mixed[0]  # its weight is changed by the merge case's op only, never merged through the layer
    names = ["default", "__base__", stack.names[min(1, stack.adapters - 1)], "default"]
    x = torch.randn(len(names), stack.dim, device=stack.device, dtype=stack.dtype)
    try:
        with torch.inference_mode():
            cuda_graph(lambda: layer(x, adapter_names=names))
        return "captured"
    except Exception as err:
        return f"not capturable: {_why(err)}"


def _why(err: Exception) -> str:
    """The exception's type and first line (CUDA errors can run to pages)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
