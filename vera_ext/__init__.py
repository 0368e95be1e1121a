"""vera_ext: fast VeRA (Vector-based Random Matrix Adaptation) for PyTorch, a drop-in for PEFT's VeRA.

    from vera_ext import VeraLinear
    layer = VeraLinear(nn.Linear(1024, 1024), r=256)   # trains only layer.vera_lambda_d / vera_lambda_b
"""

from . import ops
from ._C import build_info
from .layer import BASE_ADAPTER, VeraLinear
from .projection import VeraProjection, generate_projection

__version__ = "0.1.0"

__all__ = ["BASE_ADAPTER", "VeraLinear", "VeraProjection", "build_info", "generate_projection", "ops"]

# Model-level VeRA (issue 6): config, injection, PEFT-format checkpoints, mixed batches, PEFT patching.
from .config import VeraConfig
from .model import VeraModel, get_vera_model
from .peft_patch import is_peft_patched, patch_peft, unpatch_peft

__all__ += ["VeraConfig", "VeraModel", "get_vera_model", "is_peft_patched", "patch_peft", "unpatch_peft"]

# Compile, autocast and meta-device init (issue 8): autocast rules are registered by vera_ext.ops on import.
from .meta_init import materialize

__all__ += ["materialize"]
