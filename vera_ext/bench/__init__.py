"""The benchmark behind `python -m vera_ext bench`: the base layer alone vs PEFT's VeRA vs vera_ext, side by side
in one process, with the machine's ceilings measured in the same run.

``cli`` holds the command line and the suite (settings, measuring each case, the report), ``cases`` the shape
presets and the standard one-layer cases, ``stack`` the cases on a stack of layers sharing one projection,
``model_cases`` the whole-model cases (a training step and a decoded token of a transformers model),
``preset`` the fixed plans (``--preset h200``: the GPU plan with its TARGET lines), ``timing`` interleaved timing
and the ceilings, ``report`` the records, table, JSON and plot, ``trace`` the profiler traces (--trace).
"""

from .cli import main

__all__ = ["main"]
