"""How transformers' ``Trainer`` and TRL's ``SFTTrainer`` recognise a VeraModel as an adapter model.

transformers 5.24 decides by class, not by duck typing:

- ``Trainer._save`` calls ``model.save_pretrained(output_dir, state_dict=..., is_main_process=...)`` only for
  instances of ``supported_classes = (PreTrainedModel, PeftModel)``; any other model has its whole
  ``state_dict()`` written to ``model.safetensors``.
- ``Trainer._load_from_checkpoint`` (resume) and ``Trainer._load_best_model`` call ``model.load_adapter(dir,
  active_adapter, ...)`` only when ``trainer_utils._is_peft_model(model)``, i.e. ``isinstance(model, PeftModel)``.
- ``Trainer._set_signature_columns_if_needed`` (``remove_unused_columns``) and ``Trainer.__init__`` (label names,
  loss kwargs) read the forward signature of ``model.get_base_model()`` for PEFT models; TRL's ``SFTTrainer`` and
  accelerate use ``isinstance(model, PeftModel)`` too.

So when PEFT is installed and the wrapped model is a transformers ``PreTrainedModel``, ``VeraModel(...)`` returns an
instance of a subclass that also derives from ``peft.PeftModel`` (built here, once). Only the class relation comes
from PEFT: every member ``PeftModel`` defines and VeraModel does not is hidden (looking it up falls through to
``VeraModel.__getattr__``, as on a plain VeraModel), ``PeftModel.__init__`` never runs, and the instance behaves
exactly as a plain VeraModel.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["peft_recognised_class", "is_transformers_model"]

_CLASSES: dict[type, type] = {}


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (never imports transformers: a model of it implies it
    is loaded)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling_utils, "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


class _Hidden:
    """Non-data descriptor standing in for a ``PeftModel`` member: reading it raises AttributeError, so Python
    falls back to ``__getattr__``; an instance attribute of the same name takes precedence over it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        raise AttributeError(self.name)


def peft_recognised_class(base: type) -> Optional[type]:
    """``base`` (VeraModel) + ``peft.PeftModel``, or None when PEFT cannot be imported. Cached per ``base``."""
    if base in _CLASSES:
        return _CLASSES[base]
    try:
        from peft import PeftModel
    except ImportError:
        return None
    namespace: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    for name in vars(PeftModel):
        if not (name.startswith("__") and name.endswith("__")) and not hasattr(base, name):
            namespace[name] = _Hidden()
    cls = type(base.__name__, (base, PeftModel), namespace)
    _CLASSES[base] = cls
    return cls
