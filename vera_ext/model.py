"""VeraModel: VeRA adapters injected into any model, with PEFT's model-level API and mixed-adapter batches."""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoint, quantized, shared_input
from .adapter_bank import SlotRegistry
from .batch_context import MixedBatch
from .config import VeraConfig
from .hf_integration import is_transformers_model, peft_recognised_class
from .lambda_store import LambdaStore, named_parameters_besides_lambdas
from .layer import BASE_ADAPTER, VeraLinear
from .mixed_batch import (
    check_adapter_indices,
    check_adapter_names,
    receivers,
    run_mixed_batch,
    run_with_adapter_names,
    slot_indices,
)
from .modules_to_save import ModulesToSave
from .plan import AdapterPlan, plan_adapter
from .projection import VeraProjection
from .targets import base_dtype_device, is_conv1d

__all__ = ["VeraModel", "get_vera_model"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def get_vera_model(model: nn.Module, config: VeraConfig, adapter_name: str = "default") -> "VeraModel":
    """Inject a VeRA adapter into ``model`` (changed in place) and return the :class:`VeraModel` wrapping it.
    ``config`` is a :class:`vera_ext.VeraConfig` or PEFT's ``VeraConfig``."""
    return VeraModel(model, config, adapter_name)


class VeraModel(nn.Module):
    """``model`` with VeRA layers in place of its target modules, one shared projection for all of them.

    The API is PEFT's (``PeftModel`` + ``VeraModel``): ``add_adapter``, ``set_adapter``, ``delete_adapter``,
    ``disable_adapter()``, ``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``, ``unload``,
    ``save_pretrained``, ``from_pretrained``, ``load_adapter``, ``print_trainable_parameters``. Attributes it
    does not have are read from the wrapped model. ``forward(..., adapter_names=[...])`` runs a mixed batch: one
    adapter name per sample (``"__base__"``: none), all in one pass.
    """

    prefix = "vera_lambda_"

    def __new__(cls, *args: Any, **kwargs: Any):
        # A transformers model gets the PeftModel-recognised subclass (when PEFT is installed), so that Trainer and
        # SFTTrainer save/resume/inspect it as an adapter model; see hf_integration.
        model = args[0] if args else kwargs.get("model")
        if cls is VeraModel and is_transformers_model(model):
            cls = peft_recognised_class(VeraModel) or cls
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: VeraConfig, adapter_name: str = "default"):
        nn.Module.__init__(self)  # not super(): PeftModel.__init__ (in the recognised subclass's MRO) must not run
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, VeraModel) or any(isinstance(m, (VeraLinear, ModulesToSave)) for m in model.modules()):
            raise ValueError("model already holds VeRA layers; add more adapters with VeraModel.add_adapter")
        self.model = model
        self.peft_config: dict[str, VeraConfig] = {}
        self.vera_projection: Optional[VeraProjection] = None
        self.targeted_module_names: list[str] = []
        self.active_adapter: Union[str, list[str]] = adapter_name
        self._adapters_disabled = False
        # One slot per adapter name, the same row of every layer's adapter bank (docs/DESIGN.md §2.6).
        self._adapter_slots = SlotRegistry()
        self._min_bank_capacity = 0
        try:
            self.add_adapter(adapter_name, config)
        except Exception:
            self.active_adapter = []
            raise
        # The model holds each shared buffer once: the projection under vera_projection.*, not once per layer.
        self.register_state_dict_post_hook(_drop_layer_projections)
        self.register_load_state_dict_pre_hook(_add_layer_projections)
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", True)
        if checkpointing:  # as PeftModel.__init__ does
            _make_inputs_require_grad(model)

    # ----------------------------------------------------------------------------------------- bookkeeping

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)  # not super(): skip PeftModel.__getattr__ in the subclass
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def vera_layers(self) -> dict[str, VeraLinear]:
        """{path in the model: VeraLinear}."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, VeraLinear)}

    def modules_to_save_wrappers(self) -> dict[str, ModulesToSave]:
        """{path in the model: ModulesToSave}."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, ModulesToSave)}

    @property
    def vera_A(self) -> dict[str, torch.Tensor]:
        """{adapter: shared vera_A}, as PEFT's BufferDict (every adapter shares one tensor)."""
        return {} if self.vera_projection is None else {n: self.vera_projection.vera_A for n in self.peft_config}

    @property
    def vera_B(self) -> dict[str, torch.Tensor]:
        return {} if self.vera_projection is None else {n: self.vera_projection.vera_B for n in self.peft_config}

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its VeRA layers), as ``PeftModel.get_base_model``."""
        return self.model

    @property
    def base_model(self) -> "VeraModel":
        """PEFT's layout: ``peft_model.base_model`` is the tuner (here: this model), ``base_model.model`` the
        wrapped model; state-dict keys ``base_model.model.<path>`` follow it."""
        return self

    def _require_adapters(self, names: Sequence[str], what: str = "Adapter {} not found.") -> None:
        for name in names:
            if name not in self.peft_config:
                raise ValueError(what.format(name) + f" Known adapters: {list(self.peft_config)}")

    # ----------------------------------------------------------------------------------------- adding

    def add_adapter(self, adapter_name: str, config: VeraConfig) -> None:
        """Add adapter ``adapter_name`` (not made active; the first adapter of a model is). PEFT's checks: one
        ``projection_prng_key`` and one ``save_projection`` for all adapters, at most one adapter with a bias
        mode, and the shared projection must fit every target. A refused call changes nothing."""
        config = VeraConfig.from_peft(config)
        self.apply_adapter_plan(self.plan_adapter(adapter_name, config), config)

    def plan_adapter(self, adapter_name: str, config: VeraConfig) -> AdapterPlan:
        """Everything :meth:`add_adapter` would do, checked; raises on any problem. Changes nothing."""
        config = VeraConfig.from_peft(config)
        self.check_adapter_name(adapter_name)
        # Every adapter added so far passed these checks, so all share one key and one save_projection: comparing
        # with the first is comparing with all (O(1) per add, not O(adapters): adding K adapters stays linear).
        existing = next(iter(self.peft_config.values()), None)
        if existing is not None and existing.projection_prng_key != config.projection_prng_key:
            raise ValueError(
                "Vera PRNG initialisation key must be the same for all adapters. Got "
                f"config.projection_prng_key={config.projection_prng_key} but previous config had "
                f"{existing.projection_prng_key}."
            )
        if existing is not None and existing.save_projection != config.save_projection:
            raise ValueError(
                "VeRA projection weights must be saved for all adapters or none, but got multiple different values: "
                f"{sorted({existing.save_projection, config.save_projection})}"
            )
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError(
                "VeraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all "
                "adapters."
            )
        return plan_adapter(self.model, config, adapter_name, self.vera_projection)

    def check_adapter_name(self, adapter_name: str) -> None:
        """ValueError unless ``adapter_name`` can name a new adapter."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"adapter_name {BASE_ADAPTER!r} is reserved: it means 'no adapter' in mixed batches")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")

    def reserve_adapter_slots(self, count: int) -> None:
        """Grow every layer's adapter bank once for ``count`` more adapters (what load_adapters does first)."""
        registry = self._adapter_slots
        rows = registry.high_water + max(0, count - registry.free_slots())
        for layer in self.vera_layers().values():
            layer._bank.reserve(rows)

    def apply_adapter_plan(self, plan: AdapterPlan, config: VeraConfig) -> None:
        """Carry out a plan from :meth:`plan_adapter` (``config`` is stored as the adapter's config, with its
        resolved target_modules/modules_to_save and fan_in_fan_out corrected as PEFT does)."""
        first = self.vera_projection is None
        # Adding an adapter that wraps no modules_to_save changes no other parameter's trainability: only its own
        # lambdas (frozen: it is not active) and the base parameters of the layers it wraps are touched, so the
        # add costs O(its targets), not O(adapters) (docs/DESIGN.md §2.6).
        fast = not first and not plan.modules_to_save
        previous = None if first or fast else self._grad_state()
        if first:
            self.vera_projection = _projection_as_peft_makes_it(plan)
        config.target_modules = copy.copy(plan.config.target_modules)  # (a plan may serve several adapters)
        config.modules_to_save = copy.copy(plan.config.modules_to_save)
        self.peft_config[plan.name] = config
        name, r = plan.name, config.r
        active = self.active_adapters
        for target in plan.targets:
            if isinstance(target.module, VeraLinear):
                layer = target.module
                layer.update_layer(
                    name,
                    r,
                    vera_dropout=config.vera_dropout,
                    d_initial=config.d_initial,
                    init_weights=config.init_weights,
                )
            else:
                _warn_fan_in_fan_out(config, target.conv1d)
                base_grads = {p: p.requires_grad for p in target.module.parameters()} if fast else {}
                layer = VeraLinear(
                    target.module,
                    r,
                    projection=self.vera_projection,
                    adapter_name=name,
                    vera_dropout=config.vera_dropout,
                    d_initial=config.d_initial,
                    init_weights=config.init_weights,
                    fan_in_fan_out=target.conv1d,
                    slots=self._adapter_slots,
                )
                _replace(self.model, target.path, layer)
                if target.path not in self.targeted_module_names:
                    self.targeted_module_names.append(target.path)
                if fast:
                    layer.set_adapter([n for n in active if n in layer.vera_lambda_d])
                    for p, requires_grad in base_grads.items():
                        p.requires_grad_(requires_grad)
            _round_like_peft(layer, name, target.base)
            if fast:
                layer.set_lambdas_requires_grad([name], False)
        self._reserve_bank_rows()
        if fast:
            return
        for path in plan.modules_to_save:
            module = self.model.get_submodule(path)
            if isinstance(module, ModulesToSave):
                module.add(name)
            else:
                _replace(self.model, path, ModulesToSave(module, name))
        if first:
            saved = {id(p) for w in self.modules_to_save_wrappers().values() for p in w.modules_to_save.parameters()}
            for _, p in named_parameters_besides_lambdas(self.model):
                if id(p) not in saved:
                    p.requires_grad_(False)
        self._activate(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_bias_trainable()
        if previous is not None:
            self._restore_grad_state(previous)

    def _reserve_bank_rows(self) -> None:
        """Every layer's bank holds a row for every slot handed out (a layer lacking an adapter: a zero row), so
        one index tensor serves all layers. Banks grow geometrically: this walks the layers O(log adapters) times."""
        rows = self._adapter_slots.high_water
        if rows <= self._min_bank_capacity:
            return
        layers = self.vera_layers().values()
        for layer in layers:
            layer._bank.reserve(rows)
        self._min_bank_capacity = min((layer._bank.capacity for layer in layers), default=0)

    def _grad_state(self, adapters_only: bool = False) -> tuple:
        """Every parameter's requires_grad, or only the adapters' (λ and modules_to_save copies), for
        :meth:`_restore_grad_state`; the λ are read through their stores, which creates no Parameters."""
        if adapters_only:
            wrappers = self.modules_to_save_wrappers().values()
            others = {p: p.requires_grad for w in wrappers for p in w.modules_to_save.parameters()}
        else:
            others = {p: p.requires_grad for _, p in named_parameters_besides_lambdas(self)}
        stores = {store: store.grad_state() for store in self.modules() if isinstance(store, LambdaStore)}
        return others, stores

    def _restore_grad_state(self, state: tuple) -> None:
        others, stores = state
        for p, requires_grad in others.items():
            p.requires_grad_(requires_grad)
        for store, grads in stores.items():
            store.restore_grad_state(grads)

    def _activate(self, names: list[str], inference_mode: bool = False) -> None:
        """Route the layers to ``names`` and make exactly their adapter weights trainable (PEFT's set_adapter)."""
        trainable = () if inference_mode else names
        for layer in self.vera_layers().values():
            layer.set_adapter([n for n in names if n in layer.vera_lambda_d])
            for store in layer._lambda_stores():
                store.require_grad_only(trainable)
        for wrapper in self.modules_to_save_wrappers().values():
            wrapper.set_adapter(names, inference_mode)

    def _mark_bias_trainable(self) -> None:
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias == "all":  # PEFT marks biases before wrapping modules_to_save, whose originals stay frozen
                inside = tuple(f"{path}." for path in self.modules_to_save_wrappers())
                for n, p in named_parameters_besides_lambdas(self.model):
                    if (n == "bias" or n.endswith(".bias")) and not n.startswith(inside):
                        p.requires_grad_(True)
            elif bias == "vera_only":
                for layer in self.vera_layers().values():
                    if isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                        layer.base_layer.bias.requires_grad_(True)

    # ----------------------------------------------------------------------------------------- switching

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list, summed) the active adapter(s); their weights become trainable unless
        ``inference_mode``. Merged layers are unmerged first, with PEFT's warning."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._require_adapters(names)
        for wrapper in self.modules_to_save_wrappers().values():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"Only one adapter can be set at a time for modules_to_save, got {held}")
        for layer in self.vera_layers().values():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
        self._activate(names, inference_mode)
        self.active_adapter = adapter_name if isinstance(adapter_name, str) else names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere (refused while it is merged). If it was active, the remaining active ones
        stay, or the first remaining adapter by name becomes active (with PEFT's warning)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for layer in self.vera_layers().values()):
            raise ValueError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers announce their own choice; the model-level one is below
            for layer in self.vera_layers().values():
                if adapter_name in layer.vera_lambda_d:
                    layer.delete_adapter(adapter_name)
        for wrapper in self.modules_to_save_wrappers().values():
            wrapper.delete(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}."
            )
        self._activate(remaining)
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model runs as the base model (bias modes aside, as in PEFT)."""
        if self._adapters_disabled:
            yield
            return
        grads = self._grad_state(adapters_only=True)
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self._enable(True)
            self._restore_grad_state(grads)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        self._enable(False)
        for layer in self.vera_layers().values():
            for store in layer._lambda_stores():
                store.require_grad_only(())
        for wrapper in self.modules_to_save_wrappers().values():
            for p in wrapper.modules_to_save.parameters():
                p.requires_grad_(False)

    def set_keep_merged_weight(self, enabled: bool = True) -> None:
        """fp32/fp64 training: let every VeRA layer keep W + dW from its forward for its backward where that pays
        (dW formed once per step, about 10 instead of 14 adapter products per q/k/v/o block at N >= in_features/3),
        at the price of one (out, in) fp32 tensor per layer saved for the backward (VeraLinear.keep_merged_weight).
        Off by default: it can take activation memory above LoRA's."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        for layer in self.vera_layers().values():
            layer.keep_merged_weight = enabled

    def enable_adapter_layers(self) -> None:
        self._enable(True)
        self._activate(self.active_adapters)

    def _enable(self, enabled: bool) -> None:
        for module in list(self.vera_layers().values()) + list(self.modules_to_save_wrappers().values()):
            module.enable_adapters(enabled)
        self._adapters_disabled = not enabled

    # ----------------------------------------------------------------------------------------- merging

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights. With ``safe_merge`` every layer is
        checked first and nothing is merged if any result would be non-finite."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        if adapter_names is not None:
            self._require_adapters(adapter_names)
        work = []
        for path, layer in self.vera_layers().items():
            wanted = layer.active_adapters if adapter_names is None else adapter_names
            names = [n for n in wanted if n in layer.vera_lambda_d]
            if not names:
                continue
            base = layer.base_layer
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise TypeError(
                    f"cannot merge into {path} ({type(base).__name__}): only nn.Linear and Conv1D weights can absorb "
                    "the adapter; use it unmerged"
                )
            try:
                quantized.quantization_of(base)
            except TypeError as err:
                raise TypeError(f"cannot merge into {path}: {err}") from None
            work.append((layer, names))
        if safe_merge:
            for layer, names in work:
                _check_merge_is_finite(layer, names)
        for layer, names in work:
            layer.merge(safe_merge=False, adapter_names=names)

    def unmerge_adapter(self) -> None:
        merged = [layer for layer in self.vera_layers().values() if layer.merged]
        if not merged:
            warnings.warn("Already unmerged. Nothing to do.")
        for layer in merged:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge (see :meth:`merge_adapter`) and return the model with plain modules in place of VeRA layers."""
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Return the base model with every VeRA layer removed (nothing merged)."""
        return self._unload()

    def _unload(self) -> nn.Module:
        for path, layer in self.vera_layers().items():
            _replace(self.model, path, layer.base_layer)
        for path, wrapper in self.modules_to_save_wrappers().items():
            active = wrapper.active_adapter
            _replace(self.model, path, wrapper.modules_to_save[active] if active else wrapper.original_module)
        self.peft_config = {}
        self.vera_projection = None
        self.active_adapter = []
        self._adapter_slots = SlotRegistry()
        self._min_bank_capacity = 0
        return self.model

    # ----------------------------------------------------------------------------------------- running

    def forward(
        self,
        *args: Any,
        adapter_names: Optional[Sequence[str]] = None,
        adapter_indices: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Run the model. A mixed batch, one adapter per sample: ``adapter_names`` (``"__base__"``: none) or
        ``adapter_indices``, the tensor :meth:`adapter_indices` makes of such names (one compiled graph serves
        every mix; the lambdas get no gradient through it)."""
        if torch.compiler.is_compiling() and _may_share_under_compile(self.model):
            # (eager shares u without a scope; a compiled forward needs one: see vera_ext.shared_input)
            previous = shared_input.open_scope()
            try:
                return self._run(args, kwargs, adapter_names, adapter_indices)
            finally:
                shared_input.close_scope(previous)
        return self._run(args, kwargs, adapter_names, adapter_indices)

    def _run(self, args, kwargs, adapter_names, adapter_indices=None):
        if adapter_names is None and adapter_indices is None:
            return self.model(*args, **kwargs)
        call = lambda: self.model(*args, **kwargs)  # noqa: E731
        found = receivers(self)  # (one walk of the model per call)
        if adapter_indices is not None:
            if adapter_names is not None:
                raise ValueError("pass adapter_names or adapter_indices, not both")
            idx = check_adapter_indices(self, adapter_indices, args, kwargs, found)
            return run_mixed_batch(self, MixedBatch(None, idx), call, found)
        names = check_adapter_names(self, adapter_names, args, kwargs, found)
        return run_with_adapter_names(self, names, call, found)

    def generate(
        self,
        *args: Any,
        adapter_names: Optional[Sequence[str]] = None,
        adapter_indices: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """``model.generate`` with optional per-sample adapters, by name or index tensor (repeated for each beam
        with ``num_beams``)."""
        if adapter_names is None and adapter_indices is None:
            return self.model.generate(*args, **kwargs)
        if adapter_names is not None and adapter_indices is not None:
            raise ValueError("pass adapter_names or adapter_indices, not both")
        beams = kwargs.get("num_beams", 1)
        call = lambda: self.model.generate(*args, **kwargs)  # noqa: E731
        if adapter_indices is not None:
            idx = check_adapter_indices(self, adapter_indices, (), {})
            if isinstance(beams, int) and beams > 1:
                idx = idx.repeat_interleave(beams)
            return run_mixed_batch(self, MixedBatch(None, idx), call)
        if isinstance(beams, int) and beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(beams)]
        names = check_adapter_names(self, adapter_names, (), {})
        return run_with_adapter_names(self, names, call)

    def adapter_indices(self, names: Sequence[str], device=None) -> torch.Tensor:
        """The index tensor of a mixed batch, for callers that build their own batches: one int64 slot per name
        (``"__base__"``: -1), on ``device`` (default: the layers' device). Pass it as ``adapter_indices=`` to
        :meth:`forward` / :meth:`generate`; it stays valid while those adapters exist (a deleted adapter's slot
        is reused by the next one added)."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a list of str (one adapter name per sample), got {names!r}")
        names = list(names)
        slots = self._adapter_slots.slots
        unknown = sorted({n for n in names if n != BASE_ADAPTER and (n not in self.peft_config or n not in slots)})
        if unknown:
            raise ValueError(
                f"names: unknown adapter(s) {', '.join(unknown)}; known adapters: {list(self.peft_config)} and "
                f"{BASE_ADAPTER!r} (no adapter)"
            )
        return slot_indices(self, names, self.bank_device() if device is None else device)

    def bank_device(self) -> Optional[torch.device]:
        """The device of the layers' adapter banks (the first layer's), where index tensors are made."""
        for layer in self.vera_layers().values():
            return layer._bank.lambda_b_table.device
        return None

    # ----------------------------------------------------------------------------------------- parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT counts them (buffers such as A/B are not parameters)."""
        trainable = total = 0
        for store in self.modules():  # (the λ by their rows: counting creates no Parameters)
            if isinstance(store, LambdaStore):
                for name in store:
                    n = store.numel_of(name)
                    total += n
                    trainable += n if store.requires_grad_of(name) else 0
        for _, param in named_parameters_besides_lambdas(self):
            n = param.numel()
            if n == 0 and hasattr(param, "ds_numel"):
                n = param.ds_numel
            if param.__class__.__name__ == "Params4bit":
                n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
            total += n
            trainable += n if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        selected_adapters=None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **kwargs,
    ) -> None:
        """Write PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter
        (``"default"`` at the top, others in a sub-folder of their name). Accepts PEFT's keywords as transformers'
        Trainer passes them (``state_dict``, ``save_embedding_layers``, ...): the adapter is always read from the
        live model; only the processes with ``is_main_process`` write."""
        unknown = sorted(set(kwargs) - _PEFT_SAVE_KWARGS)
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {unknown}")
        checkpoint.save_pretrained(
            self,
            save_directory,
            selected_adapters=selected_adapters,
            safe_serialization=safe_serialization,
            is_main_process=is_main_process,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs,
    ) -> "VeraModel":
        """Load an adapter directory written by PEFT or vera_ext onto ``model``. On any mismatch (architecture,
        keys, shapes, projection) it raises and ``model`` is left as it was."""
        return checkpoint.from_pretrained(
            cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )

    def load_adapters(self, paths_or_dict, is_trainable: bool = False) -> list[str]:
        """Load many adapters into the bank at once (none made active): ``paths_or_dict`` is {name: adapter
        directory (PEFT's format) or (config, tensors)}, or a list of directories named by their last component.
        All are read and checked (each against the model, and against each other) before any is inserted: a refused
        call inserts nothing. Returns the names loaded."""
        return checkpoint.load_adapters(self, paths_or_dict, is_trainable=is_trainable)

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False, **kwargs):
        """Load an adapter directory as ``adapter_name`` (not made active). A refused load changes nothing.

        As in PEFT, loading into an existing adapter (what Trainer does on ``resume_from_checkpoint`` and
        ``load_best_model_at_end``) overwrites its weights in place, keeping its config, activity and trainability;
        the checkpoint must hold exactly that adapter's tensors (same keys, shapes and projection)."""
        if adapter_name in self.peft_config:
            return checkpoint.reload_adapter(self, model_id, adapter_name)
        return checkpoint.load_adapter(self, model_id, adapter_name, is_trainable=is_trainable, **kwargs)


# --------------------------------------------------------------------------------------------------- helpers

# Keywords of peft.PeftModel.save_pretrained that transformers/TRL may pass; the adapter is read from the live model.
_PEFT_SAVE_KWARGS = {
    "state_dict",
    "save_embedding_layers",
    "path_initial_model_for_weight_conversion",
    "convert_pissa_to_lora",
}


def _layer_projection_keys(vera_model: "VeraModel", prefix: str) -> list[str]:
    return [
        f"{prefix}model.{path}.vera_projection.{name}"
        for path in vera_model.vera_layers()
        for name in ("vera_A", "vera_B")
    ]


def _drop_layer_projections(module: "VeraModel", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: each layer registers the shared projection too; keep only ``vera_projection.*``."""
    if module.vera_projection is None:
        return
    for key in _layer_projection_keys(module, prefix):
        state_dict.pop(key, None)


def _add_layer_projections(module: "VeraModel", state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the per-layer entries of the shared projection are the top-level ones."""
    if module.vera_projection is None:
        return
    for name in ("vera_A", "vera_B"):
        value = state_dict.get(f"{prefix}vera_projection.{name}")
        if value is None:
            continue
        for key in _layer_projection_keys(module, prefix):
            if key.endswith(f".{name}"):
                state_dict.setdefault(key, value)


def _may_share_under_compile(model: nn.Module) -> bool:
    """Whether a compiled forward of ``model`` may open the shared-input scope: Dynamo refuses side effects inside
    a checkpointed region, and only a transformers model says whether it checkpoints (its 5.x and 4.x flags)."""
    if not is_transformers_model(model):
        return False
    flag = getattr(model, "is_activation_checkpointing", None)
    return not (getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _make_inputs_require_grad(model: nn.Module) -> None:
    """PeftModel's preparation for gradient checkpointing (its ``_prepare_model_for_gradient_checkpointing``)."""
    if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _warn_fan_in_fan_out(config: VeraConfig, conv1d: bool) -> None:
    """PEFT's warnings when fan_in_fan_out disagrees with the layer (it then corrects the config, as here)."""
    if conv1d and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
        )
        config.fan_in_fan_out = True
    elif not conv1d and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
        )
        config.fan_in_fan_out = False


def _projection_as_peft_makes_it(plan: AdapterPlan) -> VeraProjection:
    """The shared projection drawn from the key, then (PEFT's quirk) passed through each target's fp16/bf16 dtype
    and back to fp32, and placed on the last target's device, as PEFT's per-layer moves leave it."""
    R, max_in, max_out = plan.projection_shape
    config = plan.config
    proj = VeraProjection.from_key(R, max_in, max_out, config.projection_prng_key, persistent=config.save_projection)
    A, B, device, rounding = proj.vera_A, proj.vera_B, None, []
    for target in plan.targets:
        dtype, device_ = base_dtype_device(target.base)
        if dtype is not None and dtype.is_floating_point:
            A, B = A.to(dtype), B.to(dtype)
            rounding.append(dtype)
        device = device_ or device
    if A.dtype in _LOW_PRECISION:
        A, B = A.float(), B.float()
    return VeraProjection(
        A.to(device or "cpu"),
        B.to(device or "cpu"),
        persistent=config.save_projection,
        prng_key=config.projection_prng_key,
        round_through=rounding,
    )


def _round_like_peft(layer: VeraLinear, name: str, base: nn.Module) -> None:
    """PEFT creates lambdas in the base layer's dtype and upcasts them to fp32: on fp16/bf16 models their initial
    values are rounded to that dtype. Do the same so both start from identical numbers."""
    dtype, _ = base_dtype_device(base)
    if dtype in _LOW_PRECISION:
        layer.round_lambdas_(name, dtype)


def _check_merge_is_finite(layer: VeraLinear, names: list[str]) -> None:
    base = layer.base_layer
    kind = quantized.quantization_of(base)
    # (a quantized weight is merged in fp32 and quantized again: check the fp32 sum and that it quantizes finitely)
    dtype = torch.float32 if kind is not None else base.weight.dtype
    merged = quantized.dequantize_weight(base, torch.float32) if kind is not None else base.weight.detach()
    for name in names:
        if name in layer.merged_adapters:
            continue
        delta = layer.get_delta_weight(name).to(merged.device, torch.float32)
        merged = (merged.float() + delta).to(dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    if kind is not None:
        try:
            kind.check_writable(merged)
        except ValueError as err:
            raise ValueError(f"NaNs detected in the merged weights: cannot merge into the {kind.name} weight ({err})")
