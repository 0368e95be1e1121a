"""ModulesToSave: a module trained in full per adapter (a copy each), laid out as PEFT's ModulesToSaveWrapper."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .batch_context import batch_adapter_names
from .layer import BASE_ADAPTER

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Keeps ``original_module`` (frozen) and one trainable copy per adapter in ``modules_to_save[adapter]``;
    runs the active adapter's copy (the original when none is active or adapters are disabled). State-dict keys
    are PEFT's: ``<path>.original_module.*`` and ``<path>.modules_to_save.<adapter>.*``. Attribute reads that the
    wrapper does not answer go to the module that would run (so ``lm_head.weight`` still works)."""

    #: Per-sample adapter names for one compiled mixed-batch model call (see batch_context.batch_adapter_names).
    _batch_adapter_names: Optional[list[str]] = None

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module).__name__}")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active: Optional[str] = None
        self._disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        """A frozen copy of the original module for ``adapter_name`` (set_adapter makes it trainable)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(False)

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active == adapter_name:
            self._active = None

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active

    def set_adapter(self, adapter_names: Sequence[str], inference_mode: bool = False) -> None:
        """Activate the one of ``adapter_names`` this wrapper holds (several would be ambiguous: ValueError)."""
        held = [n for n in adapter_names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"Only one adapter can be set at a time for modules_to_save, got {held}")
        for copy_ in self.modules_to_save.values():
            copy_.requires_grad_(False)
        self._active = held[0] if held else None
        if self._active is not None:
            self.modules_to_save[self._active].requires_grad_(not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    def running_module(self) -> nn.Module:
        if self._disabled or self._active is None:
            return self.original_module
        return self.modules_to_save[self._active]

    def forward(self, x, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        if adapter_names is None:
            adapter_names = batch_adapter_names(self)
        if adapter_names is None or self._disabled:
            return self.running_module()(x, *args, **kwargs)
        names = list(adapter_names)
        if len(names) != len(x):
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} and "
                f"{len(x)} respectively."
            )
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name if name in self.modules_to_save else BASE_ADAPTER, []).append(i)
        if len(groups) == 1:
            (name,) = groups
            module = self.original_module if name == BASE_ADAPTER else self.modules_to_save[name]
            return module(x, *args, **kwargs)
        out = None
        for name, rows in groups.items():
            module = self.original_module if name == BASE_ADAPTER else self.modules_to_save[name]
            index = torch.tensor(rows, device=x.device)
            part = module(x[index], *args, **kwargs)
            if out is None:
                out = part.new_empty((len(names),) + tuple(part.shape[1:]))
            out[index] = part
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.running_module(), name)
