"""May the compiled ``vera_ext._C`` be loaded under the torch that is running? Decided BEFORE it is loaded, from
``vera_ext/_build_config.py``: the small file setup.py writes next to ``_C`` at build time (in-place, editable and
wheel builds alike). A ``_C`` compiled against another torch fails to load with undefined symbols at best, and at
worst loads and corrupts memory through a changed struct layout, so it is refused with a message that says what
to do instead.

What must match, and why:
  * the public torch release (``2.14.1``, with any pre/dev/post part: nightlies differ day by day): libtorch has no
    stable C++ ABI, an extension is only good for the release whose headers it was compiled with;
  * the torch build variant, ``CUDA x.y``, ``ROCm x.y`` or ``CPU-only`` (from ``torch.version.cuda``/``hip``): a
    CPU-only torch has no libtorch_cuda/libc10_cuda for the CUDA part, another CUDA ships other libraries;
  * the local version label (``+cu130``, ``+git1a2b3c``) only when both versions carry one: it names the variant or a
    source build's commit. PyPI's default wheel carries none (its ``2.14.1`` is the same CUDA build as
    ``2.14.1+cu130``), so a missing label is not a mismatch; the variant comparison decides then.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

from packaging.version import InvalidVersion, Version

REBUILD = (
    "Rebuild vera_ext under the running torch: `pip install --no-build-isolation .` in the vera_ext source "
    "(`pip install --no-build-isolation -e .` for an editable install)."
)


def torch_variant(cuda: Optional[str], hip: Optional[str] = None) -> str:
    """The build variant of a torch, from its ``torch.version.cuda`` and ``torch.version.hip``."""
    if cuda:
        return f"CUDA {cuda}"
    if hip:
        return f"ROCm {hip}"
    return "CPU-only"


def running_torch() -> tuple[str, str]:
    """(``torch.__version__``, its variant) of the torch imported in this process."""
    import torch

    return str(torch.__version__), torch_variant(torch.version.cuda, getattr(torch.version, "hip", None))


def _split(version: str) -> tuple[str, Optional[str]]:
    """(normalized public release, local label or None)."""
    try:
        parsed = Version(version)
        return parsed.public, parsed.local
    except InvalidVersion:  # not PEP 440: compare the text around "+" as it is
        public, _, local = version.partition("+")
        return public, local or None


def torch_mismatch(built: str, built_variant: str, running: str, running_variant: str) -> Optional[str]:
    """Why a ``_C`` compiled against torch ``built`` (of ``built_variant``) must not be loaded under torch
    ``running`` (of ``running_variant``), or None when it may. The reason names both versions and how to rebuild."""
    built_public, built_local = _split(built)
    running_public, running_local = _split(running)
    if built_public != running_public:
        what = "another torch release"
    elif built_variant != running_variant:
        what = f"a {running_variant} torch instead of a {built_variant} one"
    elif built_local is not None and running_local is not None and built_local != running_local:
        what = f"another build of torch {running_public} (+{running_local}, not +{built_local})"
    else:
        return None
    return (
        f"vera_ext._C was compiled against torch {built} ({built_variant}) but torch {running} ({running_variant}) "
        f"is running ({what}), and a compiled extension only works with the torch it was compiled against. {REBUILD}"
    )


def read_build_config() -> dict:
    """The ``BUILD_CONFIG`` dict of ``vera_ext/_build_config.py``. Raises ImportError, saying why and what to do,
    when the file is missing (nothing built yet, or a build made before the file existed)."""
    try:
        module = importlib.import_module(f"{__package__}._build_config")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}._build_config":
            raise
        built = importlib.util.find_spec(f"{__package__}._C") is not None
        state = (
            "vera_ext._C exists but no vera_ext/_build_config.py says which torch it was compiled against"
            if built
            else "vera_ext._C is not built"
        )
        raise ImportError(f"{state}. {REBUILD}") from None
    return dict(module.BUILD_CONFIG)


def check_build() -> dict:
    """Raises ImportError unless ``_C`` may be loaded under the running torch; returns the build config. Loads
    nothing compiled."""
    config = read_build_config()
    built_variant = torch_variant(config.get("torch_cuda"), config.get("torch_hip"))
    reason = torch_mismatch(config["torch_version"], built_variant, *running_torch())
    if reason is not None:
        raise ImportError(reason)
    return config


def started_as_info_command() -> bool:
    """True while ``python -m vera_ext info`` or ``python -m vera_ext.info`` is locating its module (``sys.argv[0]``
    is ``"-m"`` only then). The package then imports even when ``_C`` cannot load, so that the info command can
    report why; every other import raises. Python 3.9 has no ``sys.orig_argv``: there only the first form is
    recognized."""
    if sys.argv[:1] != ["-m"]:
        return False
    orig = getattr(sys, "orig_argv", None)
    if orig is None:
        return sys.argv[1:2] == ["info"]
    for i, arg in enumerate(orig[1:], start=1):
        if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module, rest = (orig[i + 1], orig[i + 2 :]) if arg == "-m" else (arg[2:], orig[i + 1 :])
            return module == f"{__package__}.info" or (module == __package__ and rest[:1] == ["info"])
    return False
