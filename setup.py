"""Build vera_ext._C: the CPU ops always, the CUDA kernels when nvcc and a CUDA build of torch are present.

Knobs (environment variables):
  VERA_EXT_CUDA          auto (default) | 1 (require the CUDA part, fail if it cannot be built) | 0 (skip it)
  TORCH_CUDA_ARCH_LIST   e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPU's arch, else "8.0;9.0", with PTX
                         for the newest arch added (+PTX) so that a newer GPU can JIT-compile the kernels
  MAX_JOBS               parallel compile jobs (read by torch's ninja build)
  VERA_EXT_DEBUG=1       -O0 -g host code, -G device code, no NDEBUG
  CUDA_HOME              the CUDA toolkit; default /usr/local/cuda when it exists, else torch's guess

Every build also writes what it compiled against (torch version and variant, CUDA toolkit, archs, debug) next to
_C as vera_ext/_build_config.py, which `import vera_ext` checks before loading _C (vera_ext/build_check.py), and as
a C header that build_info() reports. Objects are kept in build/temp-*-torch<version>/ across builds (editable
and wheel builds alike), so ninja recompiles only what changed.
"""

import glob
import importlib.util
import json
import os
import pprint
import re
import runpy
import subprocess
import sys
import sysconfig

from packaging.version import Version
from setuptools import setup

import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = Version("2.4")
# What is compiled: the one list of sources (also read by the emulated test builds).
SOURCES = runpy.run_path(os.path.join(ROOT, "csrc", "sources.py"))
DEFAULT_ARCHS = "8.0;9.0"
# The build config, written by BuildExt next to _C (for the import-time torch check) and as a header (for build_info).
CONFIG_MODULE = "_build_config.py"
CONFIG_HEADER = "vera_ext_build_config.h"


def log(msg):
    print(f"vera_ext build: {msg}", file=sys.stderr, flush=True)


def torch_version():
    return Version(torch.__version__.split("+")[0])


def resolve_cuda_home():
    """CUDA_HOME if set, else /usr/local/cuda if it exists, else torch's guess (which can be wrong: an
    nvcc wrapper in /usr/local/bin makes torch guess /usr/local, which has no CUDA headers)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda"
    return cpp_ext.CUDA_HOME


def nvidia_wheel_include_dirs():
    """cuBLAS/cuSPARSE headers shipped in the nvidia-* wheels that the CUDA build of torch depends on
    (ATen/cuda/CUDAContext.h includes them; a runtime-only toolkit does not have them)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += glob.glob(os.path.join(base, "cu[0-9]*", "include"))
        dirs += glob.glob(os.path.join(base, "cublas", "include"))
        dirs += glob.glob(os.path.join(base, "cusparse", "include"))
    return sorted(d for d in set(dirs) if os.path.isdir(d))


def cuda_decision():
    """Returns (build_cuda, cuda_home, reason). Never looks at torch.cuda.is_available(): a machine
    without a GPU still compiles the CUDA sources."""
    mode = os.environ.get("VERA_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"vera_ext build: VERA_EXT_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False, None, "VERA_EXT_CUDA=0"
    cuda_home = resolve_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        problems.append(f"no nvcc under CUDA_HOME={cuda_home!r}")
    elif not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        problems.append(f"no cuda_runtime.h under {cuda_home}/include")
    if problems:
        if mode == "1":
            raise SystemExit(
                "vera_ext build: VERA_EXT_CUDA=1 but the CUDA part cannot be built: " + "; ".join(problems)
            )
        return False, None, "; ".join(problems)
    return True, cuda_home, f"nvcc in {cuda_home} and torch built for CUDA {torch.version.cuda}"


def with_ptx(archs):
    """The arch list with PTX embedded for its newest arch ("8.0;9.0" -> "8.0;9.0+PTX"): the driver of a GPU newer
    than every listed arch JIT-compiles that PTX, where SASS alone would leave it with no kernel image."""
    entries = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not entries or any(a.endswith("+PTX") for a in entries):
        return archs
    newest = max(entries, key=lambda a: tuple(int(p) for p in re.findall(r"\d+", a)))
    return ";".join(a + "+PTX" if a == newest else a for a in entries)


def describe_archs(archs):
    """'SASS for sm_80, sm_90; PTX for compute_90' for the build line."""
    entries = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    sass = ", ".join("sm_" + a.replace("+PTX", "").replace(".", "") for a in entries)
    ptx = ", ".join("compute_" + a.replace("+PTX", "").replace(".", "") for a in entries if a.endswith("+PTX"))
    return f"SASS for {sass}; PTX for {ptx or 'none (no +PTX: GPUs newer than these archs cannot run the kernels)'}"


def arch_list():
    """TORCH_CUDA_ARCH_LIST if set (as given); else the visible GPU's arch (only to pick a default, never to decide
    whether CUDA is built); else a short list covering A100 and H100/H200. Both defaults embed PTX for the newest
    arch (with_ptx)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs, "TORCH_CUDA_ARCH_LIST"
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return with_ptx(f"{major}.{minor}"), "the visible GPU"
    except Exception:  # a broken driver must not break a CPU build
        pass
    return with_ptx(DEFAULT_ARCHS), "default"


def nvcc_release(cuda_home):
    """The CUDA toolkit release nvcc reports ("13.0"), or None when it does not say."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def make_extension():
    """Returns (the Extension, the build config BuildExt records: what _C is compiled against)."""
    if torch_version() < MIN_TORCH:
        raise SystemExit(f"vera_ext build: torch >= {MIN_TORCH} is required, found {torch.__version__}")
    debug = os.environ.get("VERA_EXT_DEBUG", "0") == "1"
    build_cuda, cuda_home, reason = cuda_decision()

    # torch adds the C++ standard it was built with. -fopenmp: at::parallel_for is a header template that only
    # runs in parallel when the caller is compiled with OpenMP (the runtime is torch's own libgomp).
    cxx_flags = ["-fvisibility=hidden", "-fopenmp"]
    cxx_flags += ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    include_dirs = [os.path.join(ROOT, d) for d in SOURCES["INCLUDE_DIRS"]]
    srcs = list(SOURCES["EXTENSION"])
    kwargs = {}

    if build_cuda:
        # torch.utils.cpp_extension reads its module-level CUDA_HOME when it builds the nvcc command.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_ext.CUDA_HOME = cuda_home
        archs, arch_source = arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        include_dirs += nvidia_wheel_include_dirs()
        srcs += SOURCES["EXTENSION_CUDA"]
        cxx_flags.append("-DVERA_EXT_WITH_CUDA")
        nvcc_flags = ["-DVERA_EXT_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += ["-O0", "-G"] if debug else ["-O3", "-DNDEBUG"]
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext_cls = cpp_ext.CUDAExtension
        log(
            f"building CPU+CUDA for archs {archs} (from {arch_source}: {describe_archs(archs)}); CUDA because {reason}"
            f"{'; debug build' if debug else ''}"
        )
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext_cls = cpp_ext.CppExtension
        log(f"building CPU only, because {reason}{'; debug build' if debug else ''}")

    kwargs["extra_link_args"] = ["-fopenmp"] + (["-g"] if debug else [])
    config = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "with_cuda": build_cuda,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else None,
        "cuda_toolkit": nvcc_release(cuda_home) if build_cuda else None,
        "debug": debug,
    }
    return ext_cls("vera_ext._C", srcs, include_dirs=include_dirs, **kwargs), config


def write_if_changed(path, text):
    """Leaves an unchanged file alone: its mtime would make ninja recompile everything that includes it."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def config_header(config):
    """The build config as C macros for csrc/module.cpp (JSON strings are valid C string literals; None is "")."""
    lines = [
        "// Generated by setup.py: what vera_ext._C is compiled against, reported by build_info(). Do not edit.",
        "#pragma once",
    ]
    for key in ("vera_ext_version", "torch_version", "torch_cuda", "cuda_archs"):
        value = config[key]
        lines.append(f"#define VERA_EXT_BUILD_{key.upper()} {json.dumps('' if value is None else str(value))}")
    return "\n".join(lines) + "\n"


def config_module(config):
    return (
        '"""What vera_ext._C was compiled against. Written by setup.py next to _C at build time (do not edit or\n'
        'commit): vera_ext.build_check reads it before loading _C, `python -m vera_ext info` reports it."""\n\n'
        f"BUILD_CONFIG = {pprint.pformat(config, sort_dicts=False)}\n"
    )


class BuildExt(cpp_ext.BuildExtension):
    """torch's BuildExtension (ninja) that also writes the build config: as a header that module.cpp compiles in,
    and as vera_ext/_build_config.py next to _C, in the build folder (what wheels and installs copy) and, for
    editable and --inplace builds, in the source package too."""

    def finalize_options(self):
        super().finalize_options()
        # Objects persist across builds, so ninja recompiles only what changed, and a wheel built after an editable
        # install (CI does) only links (setuptools gives editable builds a throwaway build_temp). The folder is keyed
        # by the torch, so objects compiled against one torch are never linked into a _C for another, whatever the
        # header timestamps say, and switching between two torches keeps both sets.
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}".replace("+", "_")
        self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")
        # distutils skips the whole extension when _C is newer than its .cpp/.cu files, blind to headers and to the
        # torch; then the config written below could describe another _C. ninja's per-object check is the right one.
        self.force = True

    def build_extensions(self):
        self.vera_config = dict(vera_ext_version=self.distribution.get_version(), **BUILD_CONFIG)
        generated = os.path.join(self.build_temp, "generated")
        write_if_changed(os.path.join(generated, CONFIG_HEADER), config_header(self.vera_config))
        for ext in self.extensions:
            ext.include_dirs.append(generated)
        super().build_extensions()
        self.write_config_module()  # self.inplace is False here: the build folder (what a wheel packs)

    def run(self):
        super().run()
        if self.inplace:  # _C was copied into the source package: its config goes with it
            self.write_config_module()

    def write_config_module(self):
        package_dir = os.path.dirname(self.get_ext_fullpath(EXTENSION.name))
        write_if_changed(os.path.join(package_dir, CONFIG_MODULE), config_module(self.vera_config))
        log(f"wrote {os.path.join(package_dir, CONFIG_MODULE)}")


EXTENSION, BUILD_CONFIG = make_extension()
setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExt},
)
