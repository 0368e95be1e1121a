"""vera_ext: fast VeRA (Vector-based Random Matrix Adaptation) for PyTorch, a drop-in for PEFT's VeRA.

    from vera_ext import VeraLinear
    layer = VeraLinear(nn.Linear(1024, 1024), r=256)   # trains only layer.vera_lambda_d / vera_lambda_b

Layers (VeraLinear, the shared VeraProjection), model-level VeRA with PEFT's API and checkpoints (VeraConfig,
VeraModel, get_vera_model), routing PEFT's own VeRA layers through our ops (patch_peft), meta-device init
(materialize), and the functional custom ops (vera_ext.ops; importing it registers their autocast rules).
"""

from . import ops
from ._C import build_info
from .config import VeraConfig
from .layer import BASE_ADAPTER, VeraLinear
from .meta_init import materialize
from .model import VeraModel, get_vera_model
from .peft_patch import is_peft_patched, patch_peft, unpatch_peft
from .projection import VeraProjection, generate_projection

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER",
    "VeraConfig",
    "VeraLinear",
    "VeraModel",
    "VeraProjection",
    "build_info",
    "generate_projection",
    "get_vera_model",
    "is_peft_patched",
    "materialize",
    "ops",
    "patch_peft",
    "unpatch_peft",
]
