"""VeraConfig: PEFT 0.21.2's VeraConfig fields and defaults, read from and written to PEFT's adapter_config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from .atomic_files import StagedFiles

__all__ = ["VeraConfig", "CONFIG_NAME", "TASK_TYPES"]

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "VERA"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "vera_only")


@dataclass
class VeraConfig:
    """Configuration of a VeRA adapter, field for field PEFT's ``VeraConfig`` (same names, defaults and JSON).

    ``target_modules``: module names (a name matches a module whose dotted path equals it or ends with ``.name``)
    or one regex string matched against the whole path (``re.fullmatch``), or ``"all-linear"``.
    ``layers_to_transform`` (int or list) with optional ``layers_pattern`` restricts list targets to those layer
    indices. ``bias``: ``"none"``, ``"all"`` or ``"vera_only"`` (which biases train and are saved).
    ``modules_to_save``: extra modules trained in full and saved with the adapter.
    """

    r: int = 256
    target_modules: Optional[Union[list[str], set[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    # PeftConfig's bookkeeping fields, kept so that adapter_config.json round-trips through PEFT.
    task_type: Optional[str] = None
    peft_type: str = PEFT_TYPE
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        peft_type = getattr(self.peft_type, "value", self.peft_type)  # PEFT's PeftType enum is a str enum
        if str(peft_type) != PEFT_TYPE:
            raise ValueError(f"peft_type must be {PEFT_TYPE!r} (vera_ext holds VeRA adapters only), got {peft_type!r}")
        self.peft_type = PEFT_TYPE
        task_type = getattr(self.task_type, "value", self.task_type)
        if task_type is not None and task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {', '.join(TASK_TYPES)}, got {task_type!r}")
        self.task_type = task_type
        _require_int("r", self.r, minimum=1)
        _require_int("projection_prng_key", self.projection_prng_key)
        if (
            isinstance(self.vera_dropout, bool)
            or not isinstance(self.vera_dropout, (int, float))
            or not (0.0 <= self.vera_dropout < 1.0)
        ):
            raise ValueError(f"vera_dropout must be a float in [0, 1), got {self.vera_dropout!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ValueError(f"d_initial must be a float, got {self.d_initial!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.target_modules = _names("target_modules", self.target_modules, allow_str=True)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)  # as PEFT does
        self.modules_to_save = _names("modules_to_save", self.modules_to_save, allow_str=False)
        self.layers_pattern = _names("layers_pattern", self.layers_pattern, allow_str=True)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ValueError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}")
            self.layers_to_transform = layers if isinstance(layers, int) else list(layers)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save vera_A and vera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations."
            )

    # ------------------------------------------------------------------------------------------ dict / JSON

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (sets become sorted lists), as PEFT writes them."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, set):
                out[key] = sorted(value)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VeraConfig":
        """Build from a dict such as a parsed adapter_config.json. Keys this version does not know (written by a
        newer PEFT) are dropped with a warning, as PEFT does."""
        if not isinstance(values, dict):
            raise TypeError(f"config values must be a dict, got {type(values).__name__}")
        if "peft_type" not in values:
            raise ValueError("adapter config has no 'peft_type'; expected 'peft_type': 'VERA'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"Unexpected keyword arguments {unknown} for class VeraConfig, these are ignored.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
            return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_peft(cls, config: Any) -> "VeraConfig":
        """Convert PEFT's ``peft.VeraConfig`` (or any object with a ``to_dict()`` of the same fields)."""
        if isinstance(config, cls):
            return config
        if not callable(getattr(config, "to_dict", None)):
            raise TypeError(f"config must be a vera_ext.VeraConfig or peft.VeraConfig, got {type(config).__name__}")
        values = dict(config.to_dict())
        values.pop("runtime_config", None)
        return cls.from_dict(values)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory}")
        os.makedirs(save_directory, exist_ok=True)
        staged = StagedFiles()  # written beside and renamed into place: a failed write loses nothing
        try:
            staged.write_text(os.path.join(save_directory, CONFIG_NAME), self.json_text())
            staged.commit()
        finally:
            staged.discard()

    def json_text(self) -> str:
        """The content of ``adapter_config.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "VeraConfig":
        """Read ``adapter_config.json`` from a local adapter directory (written by PEFT or vera_ext)."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}: not a PEFT adapter directory")
        with open(path) as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        values.pop("runtime_config", None)
        return cls.from_dict(values)


def _require_int(name: str, value: Any, minimum: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")


def _names(name: str, value: Any, allow_str: bool):
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return set(value) if isinstance(value, set) else list(value)
    kind = "a str or a list of str" if allow_str else "a list of str"
    raise ValueError(f"{name} must be None or {kind}, got {value!r}")
