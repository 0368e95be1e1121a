"""``python -m vera_ext info``: what this installation of vera_ext is and whether it can run here.

Reports the build config recorded at build time (the torch it was compiled against, CUDA toolkit, archs, debug),
the running torch and the verdict of the import-time torch check, the compiled module's own ``build_info()``, the
cubins inside it when ``cuobjdump`` is found, and whether a GPU is visible (``torch.cuda.is_available()`` now: a
report, never a build decision). Works when ``_C`` cannot be loaded: it then says why instead of its build info
(``vera_ext/__init__.py`` lets the package import for this command only). Exit status 0 when ``_C`` is loaded, 1
when it is not.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from . import build_check


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the CUDA toolkit, or triton's wheel (installed with the CUDA build of torch)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        roots += [os.path.join(p, "backends", "nvidia") for p in triton.submodule_search_locations]
    for root in filter(None, roots):
        candidate = os.path.join(root, "bin", "cuobjdump")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def list_cubins(library: str) -> str:
    """The archs of the cubins and PTX embedded in ``library`` (e.g. ``sm_90``, ``ptx compute_90``), or why not."""
    tool = find_cuobjdump()
    if tool is None:
        return "unknown (no cuobjdump found)"
    archs = []
    for flag, prefix in (("--list-elf", ""), ("--list-ptx", "ptx ")):
        try:
            out = subprocess.run([tool, flag, library], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"unknown ({tool} {flag} failed: {err})"
        archs += sorted({prefix + m for m in re.findall(r"\b(?:sm|compute)_\d+[af]?\b", out)})
    return ", ".join(archs) or "none"


def collect() -> dict:
    """The report as a dict (``--json`` prints it as is). Loads nothing that the package import did not load."""
    package = sys.modules[__package__]
    package_dir = os.path.dirname(os.path.abspath(package.__file__))
    running, running_variant = build_check.running_torch()
    report = {
        "vera_ext_version": package.__version__,
        "package_dir": package_dir,
        "torch_running": f"{running} ({running_variant})",
    }
    try:
        config = build_check.read_build_config()
        report["build_config"] = config
        built_variant = build_check.torch_variant(config.get("torch_cuda"), config.get("torch_hip"))
        report["torch_built_with"] = f"{config['torch_version']} ({built_variant})"
        report["torch_check"] = (
            build_check.torch_mismatch(config["torch_version"], built_variant, running, running_variant)
            or "ok: the same torch release and build"
        )
    except ImportError as err:
        report["build_config"] = None
        report["torch_check"] = str(err)

    load_error = getattr(package, "load_error", None)
    if load_error is None:
        report["extension"] = importlib.import_module(f"{__package__}._C").__file__
        report["build_info"] = package.build_info()
        cudart = report["build_info"].get("cuda_runtime_version")
        report["cuda_runtime_compiled"] = f"{cudart // 1000}.{cudart % 1000 // 10}" if cudart else None
    else:
        report["extension"] = f"not loaded: {load_error}"
        report["build_info"] = None
    libraries = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if report["build_config"] and report["build_config"].get("with_cuda") and libraries:
        report["cubins"] = list_cubins(libraries[0])

    import torch

    report["torch_cuda_running"] = torch.version.cuda
    if torch.cuda.is_available():
        names = [
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
        report["gpu"] = f"yes: {', '.join(names)}"
    else:
        report["gpu"] = "no (torch.cuda.is_available() is False)"
    return report


def format_report(report: dict) -> str:
    config = report["build_config"] or {}
    rows = [
        ("vera_ext", f"{report['vera_ext_version']} in {report['package_dir']}"),
        ("built with torch", report.get("torch_built_with", "unknown (no build config)")),
        ("running torch", report["torch_running"]),
        ("torch check", report["torch_check"]),
        ("CUDA part", "built" if config.get("with_cuda") else "not built" if config else "unknown"),
        ("compiled archs", config.get("cuda_archs") or "none"),
        ("CUDA toolkit (nvcc)", config.get("cuda_toolkit") or "none"),
        ("CUDA runtime compiled in", report.get("cuda_runtime_compiled") or "none"),
        ("torch's CUDA (running)", report["torch_cuda_running"] or "none"),
        ("debug build", config.get("debug", "unknown")),
        ("extension", report["extension"]),
        ("build_info()", report["build_info"]),
    ]
    if "cubins" in report:
        rows.append(("cubins in _C", report["cubins"]))
    rows.append(("GPU visible", report["gpu"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_ext info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["build_info"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
