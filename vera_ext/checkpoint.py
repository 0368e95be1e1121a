"""Adapter checkpoints in PEFT 0.21.2's directory format, both ways.

    <dir>/adapter_config.json          the "default" adapter ("peft_type": "VERA")
    <dir>/adapter_model.safetensors    base_model.model.<path>.vera_lambda_b / .vera_lambda_d,
                                       base_model.vera_A / base_model.vera_B (with save_projection),
                                       bias entries (bias="all"/"vera_only"), base_model.model.<path>.<key> of
                                       modules_to_save
    <dir>/<name>/...                   every other adapter, the same layout

Loading checks the whole checkpoint against the model before anything changes: a wrong architecture, missing or
extra keys, wrong shapes, or a projection that is not this model's fail with a ValueError naming them.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .atomic_files import StagedFiles, abandon, missing_dirs
from .config import CONFIG_NAME, VeraConfig
from .lambda_store import named_parameters_besides_lambdas
from .layer import VeraLinear
from .modules_to_save import ModulesToSave
from .plan import AdapterPlan, adapter_internals, plan_adapter

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "load_adapter",
    "load_adapters",
    "adapter_state_dict",
    "WEIGHTS_NAME",
]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"
PathLike = Union[str, os.PathLike]


def _is_bias(name: str) -> bool:
    return (name == "bias" or name.endswith(".bias")) and ".vera_lambda_" not in name


# ----------------------------------------------------------------------------------------------------- saving


def adapter_state_dict(vera_model, adapter_name: str) -> dict[str, Tensor]:
    """The live tensors of one adapter under their checkpoint keys (what ``save_pretrained`` writes)."""
    config = vera_model.peft_config[adapter_name]
    out: dict[str, Tensor] = {}
    wrappers = vera_model.modules_to_save_wrappers()
    for path, layer in vera_model.vera_layers().items():
        if adapter_name in layer.vera_lambda_d:  # (saving or filling them creates no Parameters)
            out[f"{PREFIX}{path}.vera_lambda_b"] = layer.vera_lambda_b.live(adapter_name)
            out[f"{PREFIX}{path}.vera_lambda_d"] = layer.vera_lambda_d.live(adapter_name)
            bias = getattr(layer.base_layer, "bias", None)
            if config.bias == "vera_only" and isinstance(bias, Tensor):
                out[f"{PREFIX}{path}.base_layer.bias"] = bias
    if config.bias == "all":
        inside = tuple(f"{p}." for p in wrappers)
        for name, param in named_parameters_besides_lambdas(vera_model.model):
            if _is_bias(name) and not name.startswith(inside):
                out[PREFIX + name] = param
    for path, wrapper in wrappers.items():
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = value
    if config.save_projection:
        out[VERA_A] = vera_model.vera_projection.vera_A
        out[VERA_B] = vera_model.vera_projection.vera_B
    return out


def save_pretrained(
    vera_model,
    save_directory: PathLike,
    selected_adapters: Optional[list[str]] = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
) -> None:
    """Write each adapter (default: all) as PEFT does: "default" into ``save_directory``, others into
    ``save_directory/<name>``; adapter_config.json has ``inference_mode: true``."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = list(vera_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in vera_model.peft_config]
    if unknown or isinstance(selected_adapters, str):
        raise ValueError(
            f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
            f"{list(vera_model.peft_config)} - got {selected_adapters}."
        )
    if not is_main_process:
        return
    # Nothing is written in place: every file of every adapter goes to a temporary file beside its target (fsynced),
    # and only when all are written are they renamed over the targets (os.replace), a failed rename putting back the
    # files it had already replaced. A save that fails loses nothing: the previous files stay as they were, and no
    # temporary file or newly made directory is left. (A crash between two renames can leave some files new and
    # some old, each one whole.)
    staged = StagedFiles()
    created: list[str] = []
    try:
        for name in names:
            out_dir = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            created += missing_dirs(out_dir)
            os.makedirs(out_dir, exist_ok=True)
            # cloned: safetensors refuses aliased tensors (e.g. tied weights inside modules_to_save)
            state = adapter_state_dict(vera_model, name)
            tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
            if safe_serialization:
                from safetensors.torch import save_file

                staged.write(
                    os.path.join(out_dir, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
                )
            else:
                staged.write(os.path.join(out_dir, LEGACY_WEIGHTS_NAME), lambda tmp: torch.save(tensors, tmp))
            staged.write_text(os.path.join(out_dir, CONFIG_NAME), config_to_write(vera_model, name).json_text())
        staged.commit()
    except BaseException:
        abandon(staged, created)
        raise


def config_to_write(vera_model, name: str) -> VeraConfig:
    """The config ``save_pretrained`` writes for adapter ``name`` (a copy: inference mode, the base model's name or
    path, the auto mapping of a model without a task type); the LoRA export writes the same fields."""
    config = copy.deepcopy(vera_model.peft_config[name])
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = vera_model.model.__dict__.get("name_or_path", None) or None
    if config.task_type is None:
        cls = type(vera_model.model)
        config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return config


# ---------------------------------------------------------------------------------------------------- loading


def read_adapter_dir(model_id: PathLike) -> tuple[VeraConfig, dict[str, Tensor]]:
    """(config, tensors on the CPU) of a local adapter directory."""
    directory = os.fspath(model_id)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist (vera_ext reads local directories)")
    config = VeraConfig.from_pretrained(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
    elif os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_NAME)):
        tensors = torch.load(os.path.join(directory, LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}")
    return config, tensors


def from_pretrained(
    model_class, model: nn.Module, model_id: PathLike, adapter_name: str = "default", is_trainable: bool = False
):
    """A ``model_class`` (VeraModel) around ``model`` with the adapter stored in ``model_id``; ``model`` is untouched
    on error. The class is passed in so that reading checkpoints does not depend on the model module."""
    config, tensors = read_adapter_dir(model_id)
    config.inference_mode = not is_trainable
    if adapter_internals(model):
        raise ValueError("model already holds VeRA layers; use VeraModel.load_adapter to add another adapter")
    plan = plan_adapter(model, config, adapter_name)
    _check_checkpoint(tensors, _expected_shapes(model, plan), config, None, model_id)
    vera_model = model_class(model, config, adapter_name)
    _fill(vera_model, adapter_name, tensors, load_projection=True)
    if not is_trainable:
        vera_model.eval()
    return vera_model


def load_adapter(vera_model, model_id: PathLike, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter stored in ``model_id`` as ``adapter_name`` (not activated). Changes nothing on error."""
    config, tensors = read_adapter_dir(model_id)
    config.inference_mode = not is_trainable
    plan = vera_model.plan_adapter(adapter_name, config)
    _check_checkpoint(tensors, _expected_shapes(vera_model.model, plan), config, vera_model.vera_projection, model_id)
    vera_model.apply_adapter_plan(plan, config)
    _fill(vera_model, adapter_name, tensors, load_projection=False)
    if is_trainable:  # PEFT makes a trainable loaded adapter's weights require grad even while inactive
        _make_trainable(vera_model, adapter_name)
    else:
        vera_model.eval()


def load_adapters(vera_model, paths_or_dict, is_trainable: bool = False) -> list[str]:
    """Add many adapters at once (none activated): ``paths_or_dict`` is {adapter name: adapter directory, or a
    (config, tensors) pair in the checkpoint's keys}, or a list of directories (each named by its last path
    component). Every adapter is read and checked against the model, the adapters already there and each other
    (as :func:`load_adapter` checks one) before any is inserted, so a refused call inserts nothing. Adapters with
    the same config share one plan, and the banks grow once for all. Returns the names, in order."""
    items = _adapters_to_load(vera_model, paths_or_dict)
    loaded, plans, checked = [], {}, []
    for name, source in items:
        if isinstance(source, tuple):
            config, tensors = VeraConfig.from_peft(source[0]), source[1]
            where = f"adapter {name!r} (in memory)"
            if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
                raise TypeError(
                    f"paths_or_dict[{name!r}]: tensors must be a dict of Tensors, got {type(tensors).__name__}"
                )
            config = copy.deepcopy(config)
        else:
            config, tensors = read_adapter_dir(source)
            where = source
        config.inference_mode = not is_trainable
        key = config.json_text()
        if key not in plans:
            plan = vera_model.plan_adapter(name, config)
            plans[key] = (plan, _expected_shapes(vera_model.model, plan))
        else:
            vera_model.check_adapter_name(name)
        plan, expected = plans[key]
        _check_checkpoint(tensors, expected, config, vera_model.vera_projection, where)
        checked.append((name, config, tensors, key))
    _check_together([(n, c) for n, c, _, _ in checked])
    vera_model.reserve_adapter_slots(len(checked))
    try:
        changed = False
        for name, config, tensors, key in checked:
            plan = vera_model.plan_adapter(name, config) if changed else replace(plans[key][0], name=name)
            # (an adapter that wraps new modules changes the model the later plans were made on: re-plan those)
            changed = (
                changed or bool(plan.modules_to_save) or any(not isinstance(t.module, VeraLinear) for t in plan.targets)
            )
            vera_model.apply_adapter_plan(plan, config)
            loaded.append(name)
            if config.bias == "none" and not plan.modules_to_save:
                _fill_lambdas(vera_model, plan, name, tensors)
            else:
                _fill(vera_model, name, tensors, load_projection=False)
            if is_trainable:
                _make_trainable(vera_model, name)
    except BaseException:
        for name in reversed(loaded):
            vera_model.delete_adapter(name)
        raise
    if not is_trainable:
        vera_model.eval()
    return loaded


def _fill_lambdas(vera_model, plan: AdapterPlan, name: str, tensors: dict) -> None:
    """_fill for an adapter that has only λ: straight into its targets' rows (no walk of the model per adapter)."""
    with torch.no_grad():
        for t in plan.targets:
            layer = vera_model.model.get_submodule(t.path)
            layer.vera_lambda_b.live(name).copy_(tensors[f"{PREFIX}{t.path}.vera_lambda_b"])
            layer.vera_lambda_d.live(name).copy_(tensors[f"{PREFIX}{t.path}.vera_lambda_d"])


def _adapters_to_load(vera_model, paths_or_dict) -> list[tuple[str, object]]:
    if isinstance(paths_or_dict, dict):
        items = list(paths_or_dict.items())
    elif isinstance(paths_or_dict, (list, tuple)):
        items = [(os.path.basename(os.path.normpath(os.fspath(p))), p) for p in paths_or_dict]
    else:
        raise TypeError(
            "paths_or_dict must be a dict {adapter name: directory or (config, tensors)} or a list of adapter "
            f"directories, got {type(paths_or_dict).__name__}"
        )
    if not items:
        raise ValueError("paths_or_dict is empty: no adapters to load")
    seen: set[str] = set()
    for name, source in items:
        vera_model.check_adapter_name(name)
        if name in seen:
            raise ValueError(f"paths_or_dict names adapter {name!r} twice")
        seen.add(name)
        if isinstance(source, tuple):
            if len(source) != 2:
                raise TypeError(f"paths_or_dict[{name!r}] must be a directory or a (config, tensors) pair")
        elif not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"paths_or_dict[{name!r}] must be a directory or a (config, tensors) pair, got {type(source).__name__}"
            )
    return items


def _check_together(adapters: list[tuple[str, VeraConfig]]) -> None:
    """What add_adapter checks between an adapter and those already added, among the adapters of one load."""
    first_name, first = adapters[0]
    for name, config in adapters[1:]:
        if config.projection_prng_key != first.projection_prng_key:
            raise ValueError(
                "Vera PRNG initialisation key must be the same for all adapters. Got "
                f"projection_prng_key={config.projection_prng_key} for {name!r} but {first.projection_prng_key} for "
                f"{first_name!r}."
            )
        if config.save_projection != first.save_projection:
            raise ValueError(
                "VeRA projection weights must be saved for all adapters or none, but got multiple different values: "
                f"{first_name!r} {first.save_projection}, {name!r} {config.save_projection}"
            )
    with_bias = [name for name, config in adapters if config.bias != "none"]
    if len(with_bias) > 1:
        raise ValueError(
            f"VeraModel supports only 1 adapter with bias, got {with_bias}. When using multiple adapters, set bias "
            "to 'none' for all adapters."
        )


def reload_adapter(vera_model, model_id: PathLike, adapter_name: str) -> None:
    """Overwrite the weights of the existing adapter ``adapter_name`` with those stored in ``model_id``, as PEFT's
    ``load_adapter`` does for a name it has (what Trainer's resume and load_best_model_at_end call): its config,
    activity and trainability stay. Checked like any load; changes nothing on error."""
    _, tensors = read_adapter_dir(model_id)
    expected = {key: tuple(t.shape) for key, t in adapter_state_dict(vera_model, adapter_name).items()}
    config = vera_model.peft_config[adapter_name]
    _check_checkpoint(tensors, expected, config, vera_model.vera_projection, model_id)
    _fill(vera_model, adapter_name, tensors, load_projection=False)


def _make_trainable(vera_model, adapter_name: str) -> None:
    """requires_grad_(True) on every weight of the adapter (its λ without creating Parameters)."""
    for layer in vera_model.vera_layers().values():
        if adapter_name in layer.vera_lambda_d:
            layer.set_lambdas_requires_grad([adapter_name], True)
    for wrapper in vera_model.modules_to_save_wrappers().values():
        if adapter_name in wrapper.modules_to_save:
            for param in wrapper.modules_to_save[adapter_name].parameters():
                param.requires_grad_(True)


def _expected_shapes(model: nn.Module, plan: AdapterPlan) -> dict[str, tuple]:
    """{checkpoint key: shape} the adapter will have once added (mirrors ``adapter_state_dict``)."""
    config = plan.config
    out: dict[str, tuple] = {}
    internals = adapter_internals(model)
    new_targets = [t.path for t in plan.targets if not isinstance(t.module, VeraLinear)]
    for t in plan.targets:
        out[f"{PREFIX}{t.path}.vera_lambda_b"] = (t.out_features,)
        out[f"{PREFIX}{t.path}.vera_lambda_d"] = (config.r,)
        bias = getattr(t.base, "bias", None)
        if config.bias == "vera_only" and isinstance(bias, Tensor):
            out[f"{PREFIX}{t.path}.base_layer.bias"] = tuple(bias.shape)
    if config.bias == "all":
        wrapped = [p for p, m in internals.items() if isinstance(m, ModulesToSave)] + plan.modules_to_save
        inside = tuple(f"{p}." for p in wrapped)
        for name, param in named_parameters_besides_lambdas(model):
            if _is_bias(name) and not name.startswith(inside):
                out[PREFIX + _name_after_wrapping(name, new_targets)] = tuple(param.shape)
    for path in plan.modules_to_save:
        module = model.get_submodule(path)
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in source.state_dict().items():
            out[f"{PREFIX}{path}.{key}"] = tuple(value.shape)
    if config.save_projection:
        R, max_in, max_out = plan.projection_shape
        out[VERA_A], out[VERA_B] = (R, max_in), (max_out, R)
    return out


def _name_after_wrapping(name: str, new_targets: list[str]) -> str:
    for path in new_targets:
        if name.startswith(f"{path}."):
            return f"{path}.base_layer.{name[len(path) + 1 :]}"
    return name


def _check_checkpoint(tensors: dict, expected: dict, config: VeraConfig, projection, model_id) -> None:
    where = f"checkpoint {os.fspath(model_id)!r}"
    keys = set(tensors)
    if config.save_projection and not {VERA_A, VERA_B} <= keys:
        raise ValueError(
            f"Specified to load vera_A and vera_B from state dictionary however they were not present! ({where})"
        )
    if not config.save_projection:
        if keys & {VERA_A, VERA_B}:
            warnings.warn(
                "Specified to not load vera_A and vera_B from state dictionary however they are present in state"
                " dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using"
                " `peft_config.save_projection = True`"
            )
            keys -= {VERA_A, VERA_B}
        else:
            warnings.warn(
                "Specified to not load vera_A and vera_B from state dictionary. This means we will be relying on"
                " PRNG initialisation to restore these projections using `config.projection_prng_key`, which may"
                " not be accurate on all system configurations."
            )
    missing = sorted(set(expected) - keys)
    extra = sorted(k for k in keys - set(expected) if not (config.bias != "none" and _is_bias(k)))
    if missing or extra:
        raise ValueError(
            f"{where} does not fit this model (different architecture or target_modules?): "
            f"{len(missing)} missing key(s) {_few(missing)}, {len(extra)} unexpected key(s) {_few(extra)}"
        )
    ignored = sorted(k for k in keys - set(expected))
    if ignored:
        warnings.warn(f"{where}: bias entries of modules this adapter does not train were ignored: {_few(ignored)}")
    wrong = [
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {shape}"
        for k, shape in expected.items()
        if tuple(tensors[k].shape) != shape
    ]
    if wrong:
        raise ValueError(f"{where} has tensors of the wrong shape (different architecture?): {_few(wrong)}")
    not_float = [k for k in expected if not tensors[k].is_floating_point()]
    if not_float:
        raise ValueError(f"{where} has non-floating-point tensors: {_few(not_float)}")
    if projection is not None and config.save_projection:
        same = all(
            tensors[key] is buf  # (in-memory adapters handing the model's own projection)
            or torch.equal(tensors[key].to(torch.float32), buf.detach().to("cpu", torch.float32))
            for key, buf in ((VERA_A, projection.vera_A), (VERA_B, projection.vera_B))
        )
        if not same:
            raise ValueError(
                f"{where} holds a vera_A/vera_B projection that differs from this model's shared projection; all "
                "adapters of a model share one projection, so load this adapter into a model of its own"
            )


def _fill(vera_model, adapter_name: str, tensors: dict, load_projection: bool) -> None:
    with torch.no_grad():
        for key, live in adapter_state_dict(vera_model, adapter_name).items():
            if key in (VERA_A, VERA_B) and not load_projection:
                continue  # verified equal to the model's projection
            live.copy_(tensors[key])


def _few(items: list, limit: int = 6) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
