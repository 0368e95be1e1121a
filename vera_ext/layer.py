"""VeraLinear: a VeRA adapter around any base layer, with PEFT's attribute names and methods."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C, ops, quantized, shared_input
from .adapter_bank import AdapterBank, SlotRegistry
from .lambda_store import LambdaStore
from .autocast import autocast_dtype, autocast_enabled
from .batch_context import batch_adapter_indices, batch_adapter_names
from .precision import opmath_dtype
from .projection import VeraProjection
from .targets import in_out_features, is_conv1d

__all__ = ["VeraLinear", "BASE_ADAPTER"]

#: Name that selects "no adapter" for a row of a mixed batch (PEFT's convention).
BASE_ADAPTER = "__base__"


def _in_out_features(base: nn.Module) -> tuple[int, int]:
    dims = in_out_features(base)
    if dims is None:
        raise TypeError(
            f"base_layer of type {type(base).__name__} is not supported: it needs in_features/out_features "
            "attributes (like nn.Linear) or to be a transformers Conv1D"
        )
    return dims


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


class _ForwardPlan(NamedTuple):
    """VeraLinear.forward's decisions for one state (docs/DESIGN.md §6): ``kind`` "disabled" (base layer alone,
    unmerging first), "base" (merged or no active adapter) or "adapters": ``fused`` the adapter the fused op takes
    with the base GEMM (None: the base layer runs on its own), then each of ``added`` (name, whether its u may be
    shared with the other layers reading x: not when its dropout gives it its own x) added to the result."""

    key: Optional[tuple]
    kind: str
    compute_dtype: Optional[torch.dtype] = None
    fused: Optional[str] = None
    added: tuple = ()
    dropout_modes: tuple = ()  # (dropout module, its training flag when planned): a change re-plans
    adapter_dtype: Optional[torch.dtype] = None  # quantized base: the adapter's dtype, as PEFT's (None: the base's)


class VeraLinear(nn.Module):
    """VeRA (arXiv 2310.11454) around ``base_layer``: ``y = base(x) + lambda_b * (B_l (lambda_d * (A_l dropout(x))))``.

    ``base_layer`` is an ``nn.Linear``, a transformers ``Conv1D`` (set ``fan_in_fan_out=True``) or any module with
    ``in_features``/``out_features`` whose output the adapter term is added to. A plain ``nn.Linear`` runs fused
    (base GEMM and adapter in one op). Only ``vera_lambda_d`` (r) and ``vera_lambda_b`` (out_features), fp32, are
    trained; the base layer's parameters are frozen on construction.

    ``projection`` is the shared :class:`VeraProjection` (share one instance between all layers of a model); when
    omitted, one sized to this layer is drawn from PRNG key 0 as PEFT does. Attribute names follow PEFT:
    ``base_layer``, ``vera_lambda_b``, ``vera_lambda_d``, ``vera_A``, ``vera_B``, ``vera_dropout``, ``r``,
    ``merged_adapters``, ``active_adapters``.
    """

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    #: fp32/fp64 training: keep W + dW from the forward for the backward where that pays (ops.merged_weight_mode):
    #: dW formed once per step and fewer products, at the price of an (out, in) fp32 tensor per layer saved for
    #: the backward. Off by default (VeRA's point is memory); VeraModel.set_keep_merged_weight switches it.
    keep_merged_weight: bool = False
    #: Per-sample adapter names (or slot indices) set by VeraModel for one compiled mixed-batch call (see
    #: batch_context), None otherwise. Adapters this layer lacks run on the base layer alone.
    _batch_adapter_names: Optional[list[str]] = None
    _batch_adapter_idx: Optional[Tensor] = None
    _plan: Optional[_ForwardPlan] = None  # the last forward plan (dropped when adapters change)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 256,
        *,
        projection: Optional[VeraProjection] = None,
        adapter_name: str = "default",
        vera_dropout: float = 0.0,
        d_initial: float = 0.1,
        init_weights: bool = True,
        fan_in_fan_out: bool = False,
        slots: Optional[SlotRegistry] = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        self.in_features, self.out_features = _in_out_features(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = bool(fan_in_fan_out)
        if projection is None:
            _check_rank(r)
            projection = VeraProjection.from_key(r, self.in_features, self.out_features, prng_key=0)
            projection = projection.to(_base_device(base_layer))
        elif not isinstance(projection, VeraProjection):
            raise TypeError(f"projection must be a VeraProjection, got {type(projection).__name__}")
        self.vera_projection = projection
        self.r: dict[str, int] = {}
        # Every adapter's lambdas as rows of two tables; the ParameterDicts hand out views of them (§2.6).
        # ``slots``: the model's registry, so that a slot means the same adapter in every layer.
        self._bank = AdapterBank(projection.r, self.out_features, _base_device(base_layer), slots)
        self.vera_lambda_b = LambdaStore(self._bank, "b", self.r)
        self.vera_lambda_d = LambdaStore(self._bank, "d", self.r)
        self._bank.stores = (self.vera_lambda_d, self.vera_lambda_b)
        self.vera_dropout = AdapterDropouts()
        self.register_load_state_dict_post_hook(_relink_after_load)
        self.merged_adapters: list[str] = []
        self._lambda_init: dict[str, dict] = {}  # how each adapter's lambdas were initialized (reset_lambdas_)
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, vera_dropout=vera_dropout, d_initial=d_initial, init_weights=init_weights)
        self._active_adapter = [adapter_name]

    # ------------------------------------------------------------------------------------------ adapters

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        *,
        vera_dropout: float = 0.0,
        d_initial: float = 0.1,
        init_weights: bool = True,
    ) -> None:
        """Add (or re-initialize) adapter ``adapter_name`` of rank ``r``. Like PEFT: lambda_b = 1 and
        lambda_d ~ randn (global RNG), then, with ``init_weights``, lambda_b = 0 and lambda_d = d_initial."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"adapter_name {BASE_ADAPTER!r} is reserved: it means 'no adapter' in mixed batches")
        _check_rank(r)
        if not isinstance(vera_dropout, (int, float)) or not 0.0 <= vera_dropout < 1.0:
            raise ValueError(f"vera_dropout must be a float in [0, 1), got {vera_dropout!r}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before updating it")
        self.vera_projection.check_fits(r, self.in_features, self.out_features)

        stores = self._lambda_stores()
        if adapter_name in self.r:  # (re-initialized: its old Parameters keep their values, apart from the rows)
            for store in stores:
                store.forget(adapter_name)
        self._bank.insert(adapter_name)
        self.r[adapter_name] = int(r)
        # (one shared, never mutated, record per initialization: thousands of adapters hold a reference each)
        init = _INITS.setdefault(
            (d_initial, init_weights), {"d_initial": d_initial, "init_weights": init_weights, "round_to": None}
        )
        _initialize_lambdas(self.vera_lambda_b.row(adapter_name), self.vera_lambda_d.row(adapter_name), init)
        self._plan = None
        self._lambda_init[adapter_name] = init
        for store in stores:  # (trainable, as a new nn.Parameter is; its Parameters are created when asked for)
            store.set_requires_grad([adapter_name], True)
        # (a new module is in training mode: it must follow the layer's mode, or an eval model would drop out)
        self.vera_dropout[adapter_name] = (
            nn.Dropout(p=vera_dropout).train(self.training) if vera_dropout > 0.0 else _NO_DROPOUT
        )

    add_adapter = update_layer

    def reset_vera_parameters(self, adapter_name: str, d_initial: float = 0.1) -> None:
        if adapter_name in self.vera_lambda_d:
            with torch.no_grad():
                self.vera_lambda_d.live(adapter_name).fill_(d_initial)
                self.vera_lambda_b.live(adapter_name).zero_()

    def round_lambdas_(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Round the adapter's (fp32) lambdas to ``dtype`` and back, as PEFT's lambdas are when created on a
        low-precision model; remembered, so :meth:`reset_lambdas_` repeats it."""
        self._require_known([adapter_name])
        with torch.no_grad():
            for store in (self.vera_lambda_b, self.vera_lambda_d):
                lam = store.live(adapter_name)
                lam.copy_(lam.to(dtype))
        self._lambda_init[adapter_name] = {**self._lambda_init[adapter_name], "round_to": dtype}

    def reset_lambdas_(self, adapter_name: str) -> None:
        """Initialize the adapter's lambdas in place as :meth:`update_layer` did (e.g. after ``to_empty()``):
        with ``init_weights`` lambda_b = 0 and lambda_d = d_initial, bit-identical to the first time; without,
        lambda_b = 1 and lambda_d ~ randn from the global RNG (identical only from the same RNG state)."""
        self._require_known([adapter_name])
        init = self._lambda_init[adapter_name]
        _initialize_lambdas(self.vera_lambda_b.live(adapter_name), self.vera_lambda_d.live(adapter_name), init)
        if init["round_to"] is not None:
            self.round_lambdas_(adapter_name, init["round_to"])

    def _require_known(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.vera_lambda_d]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.vera_lambda_d.keys())}")

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_names`` the active adapter(s) (several are summed, as in PEFT)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require_known(names)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. A merged adapter must be unmerged first (its delta would stay in the weight)."""
        self._require_known([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it")
        self._plan = None
        for store in self._lambda_stores():
            store.forget(adapter_name)
        self._bank.remove(adapter_name)
        del self.vera_dropout[adapter_name]
        del self.r[adapter_name]
        self._lambda_init.pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            remaining = list(self.vera_lambda_d.keys())
            self._active_adapter = remaining[:1]
            if remaining:
                warnings.warn(f"adapter {adapter_name!r} was active; {remaining[0]!r} is now the active adapter")

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """``enable_adapters(False)`` runs the base layer alone (unmerging first if needed), as PEFT does."""
        self._disable_adapters = not enabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # Shared projection, exposed per adapter like PEFT's BufferDicts (every adapter shares one pair).
    @property
    def vera_A(self) -> dict[str, Tensor]:
        return {name: self.vera_projection.vera_A for name in self.vera_lambda_d}

    @property
    def vera_B(self) -> dict[str, Tensor]:
        return {name: self.vera_projection.vera_B for name in self.vera_lambda_d}

    # ------------------------------------------------------------------------------------------ merging

    def _merge_kind(self) -> Optional[quantized.QuantizedKind]:
        """How merges reach the base weight: None for a dense weight merged in place, else the weight's quantized
        kind (dequantized, merged in fp32, quantized again: docs/DESIGN.md §6.1). TypeError, before anything
        changes, for a base that cannot absorb delta_W."""
        kind = quantized.quantization_of(self.base_layer)  # (TypeError for an unsupported quantized weight)
        # Only layers whose output is x @ W^T (+ b) can absorb delta_W: a custom module may use its weight otherwise.
        if not (isinstance(self.base_layer, nn.Linear) or is_conv1d(self.base_layer)):
            raise TypeError(
                f"merging is supported for only nn.Linear and Conv1D base layers, not "
                f"{type(self.base_layer).__name__} (the adapter can still be used unmerged)"
            )
        return kind

    def _adapter_operands(self, name: str, dtype: torch.dtype, device: torch.device):
        projection = self._modules["vera_projection"]
        A, B = projection.sliced(self.r[name], self.in_features, self.out_features, dtype, device)
        acc = opmath_dtype(dtype)
        # ParameterDict stores each entry under its key; reading _parameters directly skips ~2 us of lookup per
        # lambda on the decode path.
        ld, lb = self.vera_lambda_d._parameters[name], self.vera_lambda_b._parameters[name]
        return A, B, _as(ld, acc), _as(lb, acc)

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """``diag(lambda_b) B_l diag(lambda_d) A_l``, (out, in) or (in, out) with fan_in_fan_out, in the
        projection's dtype, computed in fp32."""
        self._require_known([adapter_name])
        proj = self.vera_projection.vera_B
        A, B, ld, lb = self._adapter_operands(adapter_name, proj.dtype, proj.device)
        return ops.vera_delta_weight(A, B, ld, lb, self.fan_in_fan_out, proj.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' delta weights to the base weight (fp32 accumulation, one rounding per adapter).
        ``safe_merge`` refuses, with ValueError and the weight untouched, a merge that would make it non-finite."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._require_known(names)
        if self.merged:
            already = set(self.merged_adapters)
            names = [n for n in names if n not in already]
            if names:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(names)}."
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        if not names:
            return
        kind = self._merge_kind()
        if kind is not None:
            self._merge_quantized(kind, names, bool(safe_merge))
            return
        weight = self.base_layer.weight
        # A safe merge of several adapters runs on a copy that is committed once all of them merged, so a broken
        # adapter after a good one leaves the weight and merged_adapters as they were (one adapter: the op itself
        # leaves the weight untouched when it refuses).
        scratch = bool(safe_merge) and len(names) > 1
        target = weight.data.clone() if scratch else weight.data
        for name in names:
            self._merge_into(target, name, 1.0, bool(safe_merge))
            if not scratch:
                self.merged_adapters.append(name)
        if scratch:
            weight.data.copy_(target)
            self.merged_adapters.extend(names)

    def _merge_into(self, weight: Tensor, name: str, alpha: float, safe: bool) -> None:
        """weight += alpha * delta_W of adapter ``name`` (vera_merge_: fp32 accumulation, one rounding)."""
        A, B, ld, lb = self._adapter_operands(name, self.vera_projection.vera_A.dtype, weight.device)
        try:
            ops.vera_merge_(weight, A, B, ld, lb, alpha, self.fan_in_fan_out, safe)
        except ValueError as err:
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken ({err})"
            ) from None

    def _merge_quantized(self, kind: quantized.QuantizedKind, names: list[str], safe: bool) -> None:
        """Merge into a quantized base: dequantize to fp32, add every adapter's delta_W there with the merge op,
        quantize once again with the layer's own settings. A refused merge installs nothing."""
        dense = kind.dequantize(self.base_layer, torch.float32)
        for name in names:
            self._merge_into(dense, name, 1.0, safe)
        if safe:
            try:
                kind.check_writable(dense)
            except ValueError as err:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter(s) {', '.join(names)} cannot be merged into "
                    f"the {kind.name} weight ({err})"
                ) from None
        kind.write(self.base_layer, dense)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta weight, most recent first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        kind = self._merge_kind()
        if kind is not None:  # (one dequantization and one quantization for all merged adapters)
            dense = kind.dequantize(self.base_layer, torch.float32)
            for name in reversed(self.merged_adapters):
                self._merge_into(dense, name, -1.0, False)
            kind.write(self.base_layer, dense)
            self.merged_adapters.clear()
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            self._merge_into(weight.data, self.merged_adapters[-1], -1.0, False)
            self.merged_adapters.pop()

    # ------------------------------------------------------------------------------------------ forward

    def _fusable(self, compute_dtype: torch.dtype, has_args: bool) -> bool:
        """Whether the fused linear op can stand in for base_layer(x); ``compute_dtype`` is autocast_dtype(x)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not self.fan_in_fan_out
            and not has_args
            and not base._forward_hooks
            and not base._forward_pre_hooks
            # (under autocast both are cast to the autocast dtype, as nn.Linear's own GEMM does)
            and compute_dtype == autocast_dtype(base.weight)
            # (a quantized weight, e.g. torchao's on an nn.Linear: the base layer's own forward computes it)
            and not quantized.is_quantized(base)
        )

    def _dropout_active(self, name: str) -> bool:
        drop = self.vera_dropout[name]
        return isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"x must be a Tensor of shape (..., in_features={self.in_features}), got {type(x).__name__}"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # (RuntimeError, as nn.Linear and PEFT raise)
            raise RuntimeError(
                f"x must have in_features={self.in_features} as its last dimension, got x of shape {tuple(x.shape)}"
            )

    def _plan_key(self, x: Tensor, has_args: bool) -> tuple:
        """Everything the forward's decisions depend on, besides the adapters (a change to those drops the plan)."""
        base = self._modules["base_layer"]
        device_type = x.device.type
        return (
            self._disable_adapters,
            bool(self.merged_adapters),
            self._active_adapter,
            self.training,
            x.dtype,
            x.device,
            torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else None,
            has_args,
            base,
            bool(base._forward_hooks or base._forward_pre_hooks),
        )

    def _forward_plan(self, x: Tensor, has_args: bool) -> "_ForwardPlan":
        """What forward does for this call: computed once and reused while adapters, modes, dtypes, devices, hooks
        and autocast stay as they were (the key), or traced afresh under torch.compile."""
        if torch.compiler.is_compiling():
            return self._make_plan(None, x, has_args)
        key = self._plan_key(x, has_args)
        plan = self._plan
        if plan is None or plan.key != key or (plan.dropout_modes and _dropout_mode_changed(plan)):
            plan = self._plan = self._make_plan(key, x, has_args)
        return plan

    def _make_plan(self, key, x: Tensor, has_args: bool) -> "_ForwardPlan":
        if self._disable_adapters:
            return _ForwardPlan(key, "disabled")
        active = [n for n in self._active_adapter if n in self.vera_lambda_d]
        if self.merged or not active:
            return _ForwardPlan(key, "base")
        drops = [self.vera_dropout[n] for n in active]
        dropout_modes = tuple((d, d.training) for d in drops if isinstance(d, nn.Dropout) and d.p > 0)
        compute_dtype = autocast_dtype(x)
        fused = None
        if self._fusable(compute_dtype, has_args) and not self._dropout_active(active[0]):
            fused, active = active[0], active[1:]
        added = tuple((n, not self._dropout_active(n)) for n in active)
        adapter_dtype = self._quantized_adapter_dtype(x.dtype)
        return _ForwardPlan(key, "adapters", compute_dtype, fused, added, dropout_modes, adapter_dtype)

    def _quantized_adapter_dtype(self, x_dtype: torch.dtype) -> Optional[torch.dtype]:
        """On a quantized base the adapter term runs in the promoted dtype of x and the projection (fp32 for a 16-bit
        x), as PEFT's does there, and is added to the base output in that dtype (docs/DESIGN.md §6.1). None: a
        dense base, whose adapter runs in the base output's dtype."""
        if not quantized.is_quantized(self.base_layer):
            return None
        return torch.promote_types(x_dtype, self.vera_projection.vera_A.dtype)

    def forward(self, x: Tensor, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs) -> Tensor:
        """``x``: (..., in_features). ``adapter_names``: one adapter name per sample (``x.shape[0]``; for a 1-D x
        one name), ``"__base__"`` for none: the whole mixed batch runs in one pass."""
        self._check_input(x)
        if adapter_names is None and not self._disable_adapters:
            batch_idx = batch_adapter_indices(self)
            if batch_idx is not None and not self.vera_dropout.any_active():
                return self._forward_indexed(x, batch_idx, args, kwargs)
            batch_names = batch_adapter_names(self)
            if batch_names is not None:
                adapter_names = [n if n in self.vera_lambda_d else BASE_ADAPTER for n in batch_names]
            elif batch_idx is not None:
                raise ValueError(
                    "adapter_indices cannot run with vera_dropout active (training mode): pass adapter_names, or "
                    "call model.eval() first"
                )
        if adapter_names is not None and not self._disable_adapters:
            return self._forward_mixed(x, list(adapter_names), args, kwargs)
        plan = self._forward_plan(x, bool(args or kwargs))
        if plan.kind != "adapters":
            if plan.kind == "disabled" and self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)

        previous_dtype = x.dtype
        if plan.fused is not None:
            # Under autocast the op casts x/weight/bias to the autocast dtype; A/B come from the cache already cast.
            A, B, ld, lb = self._adapter_operands(plan.fused, plan.compute_dtype, x.device)
            w, projection = self._modules["base_layer"]._parameters, self._modules["vera_projection"]
            result = _fused(x, w["weight"], w["bias"], A, B, ld, lb, None, projection, self.keep_merged_weight)
        else:
            result = self.base_layer(x, *args, **kwargs)
        base_dtype = result.dtype
        if plan.adapter_dtype is not None and result.dtype != plan.adapter_dtype:
            result = result.to(plan.adapter_dtype)
        for name, share in plan.added:
            x_c = x if x.dtype == result.dtype else x.to(result.dtype)
            A, B, ld, lb = self._adapter_operands(name, autocast_dtype(result), result.device)
            shared = self._modules["vera_projection"] if share else None
            result = _added(self.vera_dropout[name](x_c), result, A, B, ld, lb, None, shared)
        if result.dtype != base_dtype and plan.adapter_dtype is not None:
            result = result.to(base_dtype)
        return _restore_dtype(result, previous_dtype)

    def _forward_mixed(self, x: Tensor, names: list[str], args, kwargs) -> Tensor:
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge()` first."
            )
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of str (one per sample), got {names!r}")
        samples = 1 if x.dim() == 1 else x.shape[0]
        if len(names) != samples:
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} and "
                f"{samples} respectively."
            )
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.vera_lambda_d})
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(map(str, unknown))}; "
                f"known: {list(self.vera_lambda_d.keys())} and {BASE_ADAPTER!r}"
            )
        used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        if not used or samples == 0:
            return self.base_layer(x, *args, **kwargs)

        rows_per_sample = x.numel() // max(1, x.shape[-1]) // samples
        acc = opmath_dtype(x.dtype)
        if self._bank_serves(used, acc):
            # The bank's tables as they are, rows picked by slot: nothing stacked (§2.6).
            slot_of = self._bank.slot_of
            idx = torch.tensor([slot_of.get(n, -1) for n in names], dtype=torch.int64)
            idx = idx.repeat_interleave(rows_per_sample).to(x.device, non_blocking=True)
            bank = self._bank
            return self._mixed_terms(x, x, idx, bank.lambda_d_table, bank.lambda_b_table, bank.width, args, kwargs)

        slot = {name: i for i, name in enumerate(used)}
        idx = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64)
        idx = idx.repeat_interleave(rows_per_sample).to(x.device, non_blocking=True)

        # Adapters of different rank share one u = x A[:r_max]^T; zero-padded lambda_d masks the extra columns.
        r_max = max(self.r[n] for n in used)
        lambda_d = torch.stack([F.pad(_as(self.vera_lambda_d[n], acc), (0, r_max - self.r[n])) for n in used])
        lambda_b = torch.stack([_as(self.vera_lambda_b[n], acc) for n in used])
        x_d = self._mixed_dropout(x, names, rows_per_sample)
        return self._mixed_terms(x, x_d, idx, lambda_d, lambda_b, r_max, args, kwargs)

    def _bank_serves(self, used: list[str], acc: torch.dtype) -> bool:
        """Whether a names-given mixed batch can read the bank's tables: no gradient wanted for the lambdas of the
        adapters it uses (the tables are not the Parameters autograd tracks), no dropout, tables in op math."""
        bank = self._bank
        if bank.lambda_d_table.dtype != acc or bank.lambda_d_table.device != self.vera_lambda_d.live(used[0]).device:
            return False
        if any(self._dropout_active(n) for n in used):
            return False
        if torch.is_grad_enabled():
            ld, lb = self.vera_lambda_d, self.vera_lambda_b
            if any(ld.requires_grad_of(n) or lb.requires_grad_of(n) for n in used):
                return False
        return True

    def _forward_indexed(self, x: Tensor, sample_idx: Tensor, args, kwargs) -> Tensor:
        """A model-level mixed batch given as one slot per sample (``sample_idx`` (samples,) int64 on the device,
        -1: none), read from the bank's tables: no host work, no stacking, no loop over adapters (§2.6). The
        lambdas get no gradient on this path (VeraModel sends names instead when they need one)."""
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge()` first."
            )
        if sample_idx.device != x.device:  # (a model spread over devices: one copy per layer, no host read)
            sample_idx = sample_idx.to(x.device, non_blocking=True)
        rows_per_sample = 1 if x.dim() <= 2 else math.prod(x.shape[1:-1])
        idx = sample_idx
        if rows_per_sample != 1:  # (each sample's rows share its slot)
            idx = sample_idx.unsqueeze(1).expand(x.shape[0], rows_per_sample).reshape(-1)
        bank = self._bank
        acc = opmath_dtype(x.dtype)
        ld, lb = _as(bank.lambda_d_table, acc), _as(bank.lambda_b_table, acc)
        return self._mixed_terms(x, x, idx, ld, lb, bank.width, args, kwargs)

    def _mixed_terms(self, x, x_d, idx, lambda_d, lambda_b, r_max: int, args, kwargs) -> Tensor:
        """The base layer's output plus each row's adapter term: ``lambda_d`` (K, r_max) / ``lambda_b`` (K, O)
        stacked, ``idx`` (rows,) one entry of [-1, K) per row of x; ``x_d``: x after dropout."""
        previous_dtype = x.dtype
        compute_dtype = autocast_dtype(x)
        if self._fusable(compute_dtype, bool(args or kwargs)) and x_d is x:
            A, B = self.vera_projection.sliced(r_max, self.in_features, self.out_features, compute_dtype, x.device)
            w = self.base_layer
            return _restore_dtype(
                _fused(x, w.weight, w.bias, A, B, lambda_d, lambda_b, idx, self.vera_projection, False), previous_dtype
            )
        result = self.base_layer(x, *args, **kwargs)
        base_dtype, adapter_dtype = result.dtype, self._quantized_adapter_dtype(x.dtype)
        if adapter_dtype is not None and result.dtype != adapter_dtype:
            result = result.to(adapter_dtype)
        if x_d.dtype != result.dtype:
            x_d = x_d.to(result.dtype)
        A, B = self.vera_projection.sliced(
            r_max, self.in_features, self.out_features, autocast_dtype(result), result.device
        )
        result = _added(x_d, result, A, B, lambda_d, lambda_b, idx, self.vera_projection if x_d is x else None)
        return _restore_dtype(result if adapter_dtype is None else result.to(base_dtype), previous_dtype)

    def _mixed_dropout(self, x: Tensor, names: list[str], rows_per_sample: int) -> Tensor:
        """Each sample gets its adapter's dropout (rows of "__base__" need none: their adapter term is 0)."""
        probs = [self.vera_dropout[n].p if n != BASE_ADAPTER and self._dropout_active(n) else 0.0 for n in names]
        if not any(probs):
            return x
        if len(set(probs)) == 1:
            return F.dropout(x, probs[0], training=True)
        p = torch.tensor(probs, dtype=torch.float32, device=x.device)
        p = p.repeat_interleave(rows_per_sample).view(*x.shape[:-1], 1)
        keep = torch.rand(x.shape, device=x.device) >= p
        return x * keep / (1.0 - p).to(x.dtype)

    def _lambda_stores(self) -> tuple[LambdaStore, LambdaStore]:
        return self.vera_lambda_d, self.vera_lambda_b

    def set_lambdas_requires_grad(self, names: Iterable[str], requires_grad: bool) -> None:
        """``requires_grad_`` on both lambdas of the adapters ``names``, creating no Parameter."""
        names = list(names)
        self._require_known(names)
        for store in self._lambda_stores():
            store.set_requires_grad(names, requires_grad)

    def _apply(self, fn, recurse=True):
        # to()/half()/to_empty(): the lambda stores convert the Parameters that exist, the bank its tables, and
        # the Parameters are pointed at their rows in the converted tables.
        result = super()._apply(fn, recurse)
        if "_bank" in self.__dict__:
            self._bank.relink(fn)
        return result

    def __setstate__(self, state):
        # (unpickling and deepcopy give each Parameter its own copy: make them views of the tables again)
        super().__setstate__(state)
        if "_bank" in self.__dict__:
            self._bank.relink()

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


def _relink_after_load(layer: "VeraLinear", incompatible_keys) -> None:
    # load_state_dict post-hook: with assign=True the lambdas are new tensors, no longer views of the tables.
    layer._bank.relink()


class AdapterDropouts(nn.ModuleDict):
    """``vera_dropout``: {adapter: nn.Dropout or nn.Identity}, as PEFT's ModuleDict, except that the adapters
    without dropout share one Identity that is not registered as a submodule. So a layer with thousands of adapters
    adds no modules to ``named_modules()`` (which every model-level walk pays for) and no per-adapter module
    memory; the Dropout modules are registered (train()/eval() reach them, repr shows them)."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, nn.Module] = {}

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self._entries.pop(key, None)
        self._modules.pop(key, None)
        if isinstance(module, nn.Identity):
            module = _NO_DROPOUT
        else:
            self.add_module(key, module)
        self._entries[key] = module

    def __getitem__(self, key: str) -> nn.Module:
        return self._entries[key]

    def __delitem__(self, key: str) -> None:
        del self._entries[key]
        self._modules.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def keys(self):
        return self._entries.keys()

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def pop(self, key: str) -> nn.Module:
        module = self[key]
        del self[key]
        return module

    def clear(self) -> None:
        self._entries.clear()
        self._modules.clear()

    def update(self, modules) -> None:
        for key, module in dict(modules).items():
            self[key] = module

    def any_active(self) -> bool:
        """Whether any adapter's dropout would drop now (a registered Dropout with p > 0 in training mode)."""
        return any(m.training and m.p > 0 for m in self._modules.values())

    def extra_repr(self) -> str:
        plain = len(self._entries) - len(self._modules)
        return f"{plain} adapter(s) without dropout" if plain else ""


#: The initialization records VeraLinear.update_layer shares: {(d_initial, init_weights): record}.
_INITS: dict[tuple, dict] = {}
#: The one Identity every adapter without dropout shares (AdapterDropouts).
_NO_DROPOUT = nn.Identity()


#: Rows up to which the forward ops take their fused one-pass path, per device type (csrc: kDecodeMaxRows).
_DECODE_MAX_ROWS: dict[str, int] = _C.build_info()["decode_max_rows"]


def _training_step(x: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> bool:
    """Whether this call runs the training form (docs/DESIGN.md §2.7), with u computed once for every layer reading
    x (shared_input): when it builds a graph for a backward and has more rows than the one-pass forward takes
    (that path computes small batches in one fp32 pass, more precisely than the GEMMs, and sharing saves nothing
    there); else the forward ops."""
    if not (torch.is_grad_enabled() and (x.requires_grad or lambda_d.requires_grad or lambda_b.requires_grad)):
        return False
    if torch.compiler.is_compiling():  # (no branch on sizes: each would be a guard, and a recompile at the line)
        return True
    return x.numel() > _DECODE_MAX_ROWS.get(x.device.type, 0) * x.shape[-1]


def _fused(x, weight, bias, A, B, lambda_d, lambda_b, idx, shared: Optional[VeraProjection], keep: bool) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the adapter term: one of the two fused forms. ``shared``: the projection
    A was sliced from, when u may be shared with the other layers reading x (None: a private x, e.g. dropped)."""
    if not _training_step(x, lambda_d, lambda_b):
        return ops.vera_linear_forward(x, weight, bias, A, B, lambda_d, lambda_b, idx)
    u = shared_input.projected(x, A, shared)
    data = autocast_dtype(x)
    merged = "none"
    # (W + dW only where rounding it adds no error, and not under torch.compile: see _training_step)
    if idx is None and data == opmath_dtype(data) and not torch.compiler.is_compiling():
        merged = ops.merged_weight_mode(u.shape[0], A.shape[1], B.shape[0], A.shape[0], x.requires_grad, keep)
    return ops.vera_linear_apply(x, u, weight, bias, A, B, lambda_d, lambda_b, idx, merged)


def _added(x, base_out, A, B, lambda_d, lambda_b, idx, shared: Optional[VeraProjection]) -> Tensor:
    """``base_out`` plus the adapter term of x (dropout applied by the caller: a dropped x is not shared)."""
    if not _training_step(x, lambda_d, lambda_b):
        return ops.vera_forward(x, base_out, A, B, lambda_d, lambda_b, idx)
    u = shared_input.projected(x, A, shared)
    return ops.vera_apply(u, base_out, A, B, lambda_d, lambda_b, idx)


def _dropout_mode_changed(plan: _ForwardPlan) -> bool:
    # (a dropout module switched on its own, without the layer's train()/eval())
    return any(drop.training != mode for drop, mode in plan.dropout_modes)


def _check_rank(r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")


def _initialize_lambdas(lambda_b: Tensor, lambda_d: Tensor, init: dict) -> None:
    """PEFT's VeRA initialization, in place: lambda_b = 1 and lambda_d ~ randn (global CPU RNG, drawn even when
    overwritten next, so the RNG advances as PEFT's does); with ``init["init_weights"]`` then lambda_b = 0 and
    lambda_d = ``init["d_initial"]``."""
    with torch.no_grad():
        lambda_b.fill_(1.0)
        if lambda_d.is_contiguous() and lambda_d.device.type == "cpu" and lambda_d.dtype == torch.float32:
            torch.randn(lambda_d.shape, out=lambda_d.detach())  # (the same draws, written in place)
        else:
            lambda_d.copy_(torch.randn(lambda_d.shape))
        if init["init_weights"]:
            lambda_d.fill_(init["d_initial"])
            lambda_b.zero_()


def _restore_dtype(result: Tensor, x_dtype: torch.dtype) -> Tensor:
    """The layer returns x's dtype (as PEFT's VeRA does), except under autocast, where it returns the dtype the
    GEMMs computed in, as nn.Linear does (PEFT's LoRA does too; PEFT's VeRA would upcast to x's dtype)."""
    if result.dtype == x_dtype or autocast_enabled(result.device.type):
        return result
    return result.to(x_dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # (a no-op .to() still costs a dispatch on the decode path)
