"""vera_ext: fast VeRA (Vector-based Random Matrix Adaptation) for PyTorch, a drop-in for PEFT's VeRA.

    from vera_ext import VeraLinear
    layer = VeraLinear(nn.Linear(1024, 1024), r=256)   # trains only layer.vera_lambda_d / vera_lambda_b

Layers (VeraLinear, the shared VeraProjection), model-level VeRA with PEFT's API and checkpoints (VeraConfig,
VeraModel, get_vera_model), routing PEFT's own VeRA layers through our ops (patch_peft), quantized base layers
(vera_ext.quantized: bitsandbytes and torchao, both optional), meta-device init (materialize), export to a PEFT
LoRA adapter directory (export_lora), and the functional custom ops (vera_ext.ops; importing it registers their
autocast rules).
"""

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.1.0"

from .build_check import check_build, started_as_info_command

try:
    # Before anything loads _C: a _C compiled against another torch fails with undefined symbols. Raises an
    # ImportError naming both torch versions and how to rebuild.
    check_build()
    from . import ops, quantized
    from ._C import build_info
    from .config import VeraConfig
    from .layer import BASE_ADAPTER, VeraLinear
    from .lora_export import export_lora
    from .meta_init import materialize
    from .model import VeraModel, get_vera_model
    from .peft_patch import is_peft_patched, patch_peft, unpatch_peft
    from .projection import VeraProjection, generate_projection
except ImportError as err:
    if not started_as_info_command():
        raise
    load_error = err  # `python -m vera_ext info` reports it; nothing else is usable

__all__ = [
    "BASE_ADAPTER",
    "VeraConfig",
    "VeraLinear",
    "VeraModel",
    "VeraProjection",
    "build_info",
    "export_lora",
    "generate_projection",
    "get_vera_model",
    "is_peft_patched",
    "materialize",
    "ops",
    "patch_peft",
    "quantized",
    "unpatch_peft",
]
