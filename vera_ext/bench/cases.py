"""What the benchmark measures: shape presets from real model configs, and the named cases built on them.

Every case compares up to three implementations of the same function: ``base`` (the frozen ``nn.Linear`` alone,
the floor any adapter adds to), ``peft`` (PEFT's VeRA layer, when peft is installed, run as a user runs it:
``get_peft_model`` with its defaults) and ``vera_ext`` (:class:`VeraLinear`). PEFT's and our layers share the
base weight, the projection (ours is PEFT's, copied) and the lambdas, so they compute the same function.

Cases (N rows = tokens; I, O, r from the preset):

- ``train_fwd``, ``train_fwd_bwd``: one layer at the preset's training N; x and the lambdas require grad, the base
  is frozen; forward+backward is ``autograd.grad(layer(x), [x, lambda_d, lambda_b], g)``.
- ``saved_activations``: bytes autograd keeps for backward after one training forward (memory, not time).
- ``decode``: inference forward of one row (N=1) with one adapter.
- ``decode_cold``: ``decode`` with the caches evicted before every call, as in a model whose weights do not fit
  in them (each layer's weights then come from memory on every token).
- ``decode_mixed``: inference forward of N rows, row i using adapter i mod M of M adapters. vera_ext runs it in one
  call (``VeraLinear(x, adapter_names=...)``). PEFT's VeRA has no mixed batches (its model drops
  ``adapter_names``), so its row is what a PEFT user must do instead: for each adapter, ``set_adapter`` then the
  forward of that adapter's rows, scattered into the output. ``base`` alone is the floor.
- ``merge``: one ``merge()`` followed by one ``unmerge()`` (the weight is left as it was).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import nn

from ..layer import VeraLinear
from ..projection import VeraProjection
from .quantize_base import quantize_linear, weight_bytes
from .timing import saved_activation_bytes


@dataclass(frozen=True)
class ShapePreset:
    """A layer shape and the row counts the cases use. ``*_quick`` values replace the full ones under --quick."""

    name: str
    in_f: int
    out_f: int
    r: int
    n_train: int
    n_train_quick: int
    n_mixed: int
    n_mixed_quick: int
    adapters: int
    adapters_quick: int
    source: str
    n_decode: int = 1
    hidden: bool = False  # not listed in --help (test-sized)

    def sized(self, quick: bool, r: Optional[int] = None, n_train: Optional[int] = None) -> "ShapePreset":
        """The preset with the quick sizes applied (when ``quick``) and the given overrides."""
        s = self
        if quick:
            s = replace(s, n_train=s.n_train_quick, n_mixed=s.n_mixed_quick, adapters=s.adapters_quick)
        return replace(s, r=r or s.r, n_train=n_train or s.n_train)


SHAPES = {
    s.name: s
    for s in (
        ShapePreset(
            "cpu-1024",
            1024,
            1024,
            256,
            2048,
            256,
            64,
            16,
            32,
            8,
            "hidden-1024 q/v projections (BERT-large, GPT-2 medium, OPT-350m); the CPU targets' shape",
        ),
        ShapePreset(
            "llama2-7b-qv",
            4096,
            4096,
            256,
            8192,
            2048,
            64,
            16,
            32,
            8,
            "Llama-2-7B q_proj / v_proj (hidden 4096); training N = 4 sequences of 2048 tokens",
        ),
        ShapePreset(
            "llama2-7b-up",
            4096,
            11008,
            256,
            8192,
            2048,
            64,
            16,
            32,
            8,
            "Llama-2-7B mlp.up_proj / gate_proj (4096 -> intermediate 11008)",
        ),
        ShapePreset("tiny", 64, 48, 16, 32, 32, 8, 8, 4, 4, "test-sized", hidden=True),
    )
}
DEFAULT_SHAPE = {"cpu": "cpu-1024", "cuda": "llama2-7b-qv"}

CASES = ("train_fwd", "train_fwd_bwd", "saved_activations", "decode", "decode_cold", "decode_mixed", "merge")
CASE_HELP = {
    "train_fwd": "training forward (x and lambdas require grad)",
    "train_fwd_bwd": "training forward + backward",
    "saved_activations": "activation bytes saved for backward (memory)",
    "decode": "inference forward, N=1, one adapter",
    "decode_cold": "decode with the caches evicted before every call (weights from memory)",
    "decode_mixed": "inference forward, N rows over M adapters in one batch",
    "merge": "merge() then unmerge() of one adapter",
}


@dataclass
class Case:
    """One case ready to time: ``fns`` are the implementations' zero-argument calls (empty for a memory case)."""

    name: str
    shape: dict
    fns: dict[str, Callable[[], object]] = field(default_factory=dict)
    grad: bool = True  # False: timed under torch.inference_mode
    saved_bytes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=dict)  # per implementation
    before_each: Optional[Callable[[], object]] = None  # untimed, before every timed call (see time_interleaved)
    per_call: int = 1  # units of work in one call (the layers of a stack): times are reported per unit
    costs: dict[str, tuple[int, int]] = field(default_factory=dict)  # impl: (FLOPs, bytes) per unit; else case_cost
    floor_impl: Optional[str] = None  # the implementation whose measured time is every row's floor

    @property
    def metric(self) -> str:
        return "memory" if self.saved_bytes else "time"

    def mode(self):
        return contextlib.nullcontext() if self.grad else torch.inference_mode()


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64: a sanity check that two implementations computed the same thing."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


class Layers:
    """``base``, PEFT's VeRA (``peft``, None without peft) and ``vera_ext`` around identical weights, one projection
    and equal lambdas (``init_weights=False``, so lambda_b != 0 and the adapter term is not trivially zero), with
    ``adapters`` adapters: ``default`` then ``a1``, ``a2``, ...

    ``quantized``: ``none`` (the float ``nn.Linear``) or a quantized base (``nf4``, ``fp4``, ``int8``:
    quantize_base.py) built from that layer's weights; PEFT's and our layers then wrap copies of the quantized layer.
    ``weight_bytes``: the base weight's bytes (for a quantized base, with its quantization statistics; no bias)."""

    def __init__(
        self,
        preset: ShapePreset,
        dtype: torch.dtype,
        device: str,
        adapters: int = 1,
        seed: int = 0,
        quantized: str = "none",
    ):
        self.in_f, self.out_f, self.r = preset.in_f, preset.out_f, preset.r
        self.dtype, self.device, self.quantized = dtype, device, quantized
        torch.manual_seed(seed)
        self.base = nn.Linear(self.in_f, self.out_f, device=device, dtype=dtype).requires_grad_(False)
        bias_bytes = self.base.bias.numel() * self.base.bias.element_size()
        if quantized != "none":
            self.base = quantize_linear(self.base, quantized, device, compute_dtype=dtype)
        self.weight_bytes = weight_bytes([self.base]) - bias_bytes
        self.names = ["default"] + [f"a{i}" for i in range(1, adapters)]
        self.peft = None
        try:
            from peft import VeraConfig, get_peft_model
        except ImportError:
            projection = VeraProjection.from_key(self.r, self.in_f, self.out_f, prng_key=seed)
        else:
            holder = nn.Sequential()
            holder.add_module("layer", copy.deepcopy(self.base))

            def config():
                return VeraConfig(r=self.r, target_modules=["layer"], init_weights=False, projection_prng_key=seed)

            model = get_peft_model(holder, config())
            for name in self.names[1:]:
                model.add_adapter(name, config())
            self.peft = model.base_model.model.layer
            # PEFT's stored draw (for a low-precision model it went through that dtype): the same function.
            projection = VeraProjection(
                *(t["default"].detach().float().clone() for t in (self.peft.vera_A, self.peft.vera_B))
            )
        self.ours = VeraLinear(copy.deepcopy(self.base), self.r, projection=projection.to(device), init_weights=False)
        for name in self.names[1:]:
            self.ours.add_adapter(name, self.r, init_weights=False)
        if self.peft is not None:
            with torch.no_grad():
                for name in self.names:
                    self.ours.vera_lambda_d[name].copy_(self.peft.vera_lambda_d[name])
                    self.ours.vera_lambda_b[name].copy_(self.peft.vera_lambda_b[name])

    def impls(self) -> dict[str, nn.Module]:
        out = {"base": self.base}
        if self.peft is not None:
            out["peft"] = self.peft
        out["vera_ext"] = self.ours
        return out

    def lambdas(self, impl: str) -> list[torch.Tensor]:
        """The trainable tensors of the active adapter (none for the base)."""
        layer = self.impls()[impl]
        return [] if impl == "base" else [layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]]


def _dims(layers: Layers, n: int, **more) -> dict:
    """The case's sizes; with a quantized base, also its kind (``base``)."""
    quantized = {"base": layers.quantized} if layers.quantized != "none" else {}
    return {"N": n, "I": layers.in_f, "O": layers.out_f, "r": layers.r, **more, **quantized}


def _costs(layers: Layers, case: str, shape: dict, impls) -> dict[str, tuple[int, int]]:
    """A quantized base's (FLOPs, bytes) per implementation: ``case_cost`` with the quantized weight's bytes
    (empty for a float base: measure_case then calls case_cost itself)."""
    if layers.quantized == "none":
        return {}
    elem = layers.dtype.itemsize
    return {k: case_cost(case, shape, k != "base", elem, layers.weight_bytes) for k in impls}


def training_cases(layers: Layers, n: int, selected: set[str]) -> list[Case]:
    """train_fwd, train_fwd_bwd and saved_activations (those in ``selected``) at N = n."""
    dev, dt = layers.device, layers.dtype
    # Two inputs alternate so that no implementation is timed on data a previous call left in cache.
    xs = [torch.randn(n, layers.in_f, device=dev, dtype=dt, requires_grad=True) for _ in range(2)]
    grad = torch.randn(n, layers.out_f, device=dev, dtype=dt)
    turn = [0]

    def pick() -> torch.Tensor:
        turn[0] ^= 1
        return xs[turn[0]]

    def fwd(layer, _params):
        return lambda: layer(pick())

    def fwd_bwd(layer, params):
        def run():
            x = pick()
            return torch.autograd.grad(layer(x), [x] + params, grad)

        return run

    impls = layers.impls()
    shape = _dims(layers, n)
    extra = {}
    if layers.peft is not None:
        with torch.no_grad():
            y_base, y_peft, y_ours = (impls[k](xs[0]) for k in ("base", "peft", "vera_ext"))
        extra["vera_ext"] = {
            "rel_diff_vs_peft_output": rel_diff(y_ours, y_peft),
            "rel_diff_vs_peft_adapter_term": rel_diff(y_ours - y_base, y_peft - y_base),
        }
    cases = []
    for name, make in (("train_fwd", fwd), ("train_fwd_bwd", fwd_bwd)):
        if name in selected:
            fns = {k: make(m, layers.lambdas(k)) for k, m in impls.items()}
            cases.append(Case(name, shape, fns, extra=extra, costs=_costs(layers, name, shape, fns)))
    if "saved_activations" in selected:
        saved = {k: saved_activation_bytes(m, xs[0]) for k, m in impls.items()}
        cases.append(Case("saved_activations", shape, saved_bytes=saved))
    return cases


def decode_case(layers: Layers, n: int) -> Case:
    """One adapter, inference, N = n rows."""
    x = torch.randn(n, layers.in_f, device=layers.device, dtype=layers.dtype)
    fns = {k: (lambda m=m: m(x)) for k, m in layers.impls().items()}
    shape = _dims(layers, n)
    return Case("decode", shape, fns, grad=False, costs=_costs(layers, "decode", shape, fns))


#: Bytes written to evict the caches before each decode_cold call: several times the last-level cache (32 MiB on
#: the CPU dev machine; the H200's L2 is 60 MiB).
EVICT_MIB = {"cpu": 128, "cuda": 512}


def decode_cold_case(layers: Layers, n: int) -> Case:
    """``decode_case`` with the caches evicted before every timed call: the time of a layer whose weights come
    from memory, as in the decode of a model much larger than the caches."""
    case = decode_case(layers, n)
    evict = torch.empty(EVICT_MIB[torch.device(layers.device).type] * 2**20, dtype=torch.uint8, device=layers.device)
    return replace(case, name="decode_cold", before_each=lambda: evict.fill_(1))


def decode_mixed_case(layers: Layers, n: int) -> Case:
    """N = n rows, row i on adapter i mod M (M = len(layers.names)), inference."""
    dev = layers.device
    names = [layers.names[i % len(layers.names)] for i in range(n)]
    x = torch.randn(n, layers.in_f, device=dev, dtype=layers.dtype)
    fns = {"base": lambda: layers.base(x)}
    extra = {}
    if layers.peft is not None:
        peft = layers.peft
        groups = [
            (a, torch.tensor([i for i, b in enumerate(names) if b == a], device=dev)) for a in dict.fromkeys(names)
        ]

        def peft_loop():
            out = torch.empty(n, layers.out_f, device=dev, dtype=layers.dtype)
            for adapter, rows in groups:
                peft.set_adapter(adapter, inference_mode=True)
                out[rows] = peft(x[rows])
            return out

        fns["peft"] = peft_loop
        extra["peft"] = {"method": "per-adapter loop: set_adapter + forward of its rows (no mixed batches)"}
    fns["vera_ext"] = lambda: layers.ours(x, adapter_names=names)
    extra["vera_ext"] = {"method": "one call, VeraLinear(x, adapter_names=...)"}
    if layers.peft is not None:
        with torch.inference_mode():
            extra["vera_ext"]["rel_diff_vs_peft_output"] = rel_diff(fns["vera_ext"](), fns["peft"]())
    shape = _dims(layers, n, M=len(layers.names))
    costs = _costs(layers, "decode_mixed", shape, fns)
    return Case("decode_mixed", shape, fns, grad=False, extra=extra, costs=costs)


def merge_case(layers: Layers) -> Case:
    """merge() then unmerge() of the default adapter (no base row: the base layer has nothing to merge)."""

    def merge_unmerge(layer):
        def run():
            layer.merge()
            layer.unmerge()

        return run

    fns = {k: merge_unmerge(m) for k, m in layers.impls().items() if k != "base"}
    return Case("merge", {"I": layers.in_f, "O": layers.out_f, "r": layers.r}, fns)  # grad mode, as users merge


def case_cost(case: str, shape: dict, adapter: bool, elem: int, weight_bytes: Optional[int] = None) -> tuple[int, int]:
    """(FLOPs, bytes that must move) of ``case``: lower bounds for any implementation of the base layer's function
    alone, or with the VeRA term (``adapter``). ``elem`` is the activation/weight element size; lambdas are fp32.
    ``weight_bytes``: the base weight's bytes when they are not ``elem * I * O`` (a quantized base).

    FLOPs count the GEMMs (elementwise work, a few flops an element, is left out). Training forward: 2NIO (base)
    + 2Nr(I+O) (x A^T, h B^T). Backward with a frozen base: 2NIO for dx; the adapter needs at least g B^ (2NOr) and
    (gv * lambda_d) A (2NrI); d lambda_b can come from a saved N x O product elementwise (PEFT) or from a g^T h GEMM
    (vera_ext, 2NOr more, to save memory), so the floor counts neither. Bytes: every operand read once, every
    result written once (inputs, W, A_l, B_l, the lambdas used, outputs and gradients).
    """
    i, o, r = shape["I"], shape["O"], shape["r"]
    n = shape.get("N", 0)
    w = elem * i * o if weight_bytes is None else weight_bytes
    lam = 4 * (r + o)  # one adapter's lambdas
    proj = elem * r * (i + o)  # A_l and B_l
    if case == "merge":  # delta_W = B^ A^ (an O x r by r x I GEMM), W read and written; twice (merge, unmerge)
        return 2 * 2 * o * r * i, 2 * (2 * w + proj + lam)
    if case == "train_fwd_bwd":
        flops = 4 * n * i * o + (4 * n * r * (i + o) if adapter else 0)
        moved = elem * (2 * n * i + 2 * n * o) + w + ((proj + 2 * lam) if adapter else 0)
        return flops, moved
    flops = 2 * n * i * o + (2 * n * r * (i + o) if adapter else 0)
    moved = elem * (n * i + n * o) + w
    if adapter:
        used = min(n, shape.get("M", 1))
        moved += proj + used * lam + (8 * n if "M" in shape else 0)  # + the row -> adapter index
    return flops, moved
