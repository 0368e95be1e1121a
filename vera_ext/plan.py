"""plan_adapter: everything adding an adapter will do to a model, decided and checked before anything changes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .config import VeraConfig
from .layer import VeraLinear
from .modules_to_save import ModulesToSave
from .projection import VeraProjection
from .targets import in_out_features, is_conv1d, matches_target, resolve_target_modules

__all__ = ["AdapterPlan", "Target", "plan_adapter", "adapter_internals"]

# PEFT's task-specific models add these heads to modules_to_save.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


@dataclass
class Target:
    path: str
    module: nn.Module  # what sits at `path` now: a base module, or a VeraLinear that gets one more adapter
    in_features: int
    out_features: int
    conv1d: bool

    @property
    def base(self) -> nn.Module:
        return self.module.base_layer if isinstance(self.module, VeraLinear) else self.module


@dataclass
class AdapterPlan:
    name: str
    config: VeraConfig  # a copy with target_modules / modules_to_save resolved as they will be stored
    targets: list[Target]
    modules_to_save: list[str]  # paths wrapped (or extended) with a trainable copy
    projection_shape: tuple[int, int, int]  # (R, I_max, O_max) of the shared projection after the call
    new_projection: bool


def adapter_internals(model: nn.Module, named_modules: Optional[list] = None) -> dict[str, nn.Module]:
    """{path: module} of the VeRA layers and ModulesToSave wrappers already in ``model`` (``named_modules``: the
    list of ``model.named_modules()`` when the caller has it)."""
    walk = model.named_modules() if named_modules is None else named_modules
    return {n: m for n, m in walk if isinstance(m, (VeraLinear, ModulesToSave))}


def plan_adapter(
    model: nn.Module, config: VeraConfig, name: str, projection: Optional[VeraProjection] = None
) -> AdapterPlan:
    """Match ``config`` against ``model`` as PEFT does and check the result; raises (changing nothing) when the
    adapter cannot be added. ``projection``: the model's shared projection, None for the first adapter."""
    config = copy.deepcopy(config)
    modules = list(model.named_modules())  # (one walk for the internals and the targets: adds stay cheap)
    internals = adapter_internals(model, modules)
    inside = tuple(f"{p}." for p in internals)
    heads = TASK_HEADS.get(config.task_type, [])
    if heads:
        named = list(config.modules_to_save or [])
        config.modules_to_save = named + [h for h in heads if h not in named]
    adapted = frozenset(p for p, m in internals.items() if isinstance(m, VeraLinear))
    resolve_target_modules(config, model, adapted)

    targets = []
    could_match = _name_filter(config)
    for path, module in modules:
        if not path or not could_match(path) or path.startswith(inside) or not matches_target(config, path):
            continue
        if isinstance(module, VeraLinear):
            targets.append(Target(path, module, module.in_features, module.out_features, module.fan_in_fan_out))
            continue
        dims = None if isinstance(module, ModulesToSave) else in_out_features(module)
        if dims is None:
            raise TypeError(
                f"Target module {path} ({type(module).__name__}) is not supported. VeRA adapts torch.nn.Linear, "
                "transformers.pytorch_utils.Conv1D and modules with integer in_features/out_features attributes."
            )
        targets.append(Target(path, module, dims[0], dims[1], is_conv1d(module)))
    if not targets:
        raise ValueError(_no_match_message(config, first=projection is None))

    if projection is None:
        shape = (config.r, max(t.in_features for t in targets), max(t.out_features for t in targets))
    else:
        shape = (projection.r, projection.max_in_features, projection.max_out_features)
        for t in targets:
            _check_fits(shape, t, config.r)
    modules_to_save = _modules_to_save(model, config, targets, inside)
    return AdapterPlan(name, config, targets, modules_to_save, shape, projection is None)


def _name_filter(config: VeraConfig):
    """A cheap necessary condition for matches_target: with a list of plain names, a path can match only if its
    last component is one of them (the model walk of every add then runs the full match on a few paths only)."""
    names = config.target_modules
    if isinstance(names, str) or not names or any("." in n for n in names):
        return lambda path: True
    names = frozenset(names)
    return lambda path: path.rpartition(".")[2] in names


def _check_fits(shape, target: Target, r: int) -> None:
    R, max_in, max_out = shape
    too_small = (
        "{} has a size of {} but {} or greater is required; this probably happened because an additional VeRA "
        "adapter was added after the first one with incompatible shapes."
    )
    if max_in < target.in_features:
        raise ValueError(too_small.format("vera_A", max_in, target.in_features) + f" (layer {target.path})")
    if max_out < target.out_features:
        raise ValueError(too_small.format("vera_B", max_out, target.out_features) + f" (layer {target.path})")
    if R < r:
        raise ValueError(
            f"vera_A has a size of {R} but {r} or greater is required; this probably happened because an additional "
            "VeRA adapter with a lower rank was added after the first one; loading the adapters in reverse order may "
            "solve this."
        )


def _modules_to_save(model: nn.Module, config: VeraConfig, targets: list[Target], inside: tuple) -> list[str]:
    """Paths PEFT wraps for ``modules_to_save``: every module whose path ends with one of the names (PEFT matches
    the plain suffix), not nested in another match, a VeRA layer or a wrapper's internals."""
    names = config.modules_to_save or []
    if not names:
        return []  # (no walk of the model: most adapters save no module)
    chosen: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if not path or path.startswith(inside) or not any(path.endswith(n) for n in names):
            continue
        if any(path.startswith(f"{c}.") for c in chosen):
            continue
        if isinstance(module, VeraLinear) or any(
            path == t.path or path.startswith(f"{t.path}.") or t.path.startswith(f"{path}.") for t in targets
        ):
            raise ValueError(
                f"modules_to_save entry matching {path!r} overlaps a VeRA target layer; a module is either adapted "
                "or saved in full, not both"
            )
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module).__name__} ({path})")
        chosen.append(path)
    return chosen


def _no_match_message(config: VeraConfig, first: bool) -> str:
    if first:
        return "No layers types compatible with VeRA were found. Please check `peft_config.target_modules`."
    msg = (
        f"Target modules {config.target_modules} not found in the base model. "
        "Please check the target modules and try again."
    )
    if config.layers_to_transform is not None:
        msg += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if config.layers_pattern is not None:
        msg += f" You also specified 'layers_pattern': {config.layers_pattern}."
    return msg
