"""Build vera_ext._C: the CPU ops always, the CUDA kernels when nvcc and a CUDA build of torch are present.

Knobs (environment variables):
  VERA_EXT_CUDA          auto (default) | 1 (require the CUDA part, fail if it cannot be built) | 0 (skip it)
  TORCH_CUDA_ARCH_LIST   e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPU's arch, else "8.0;9.0"
  MAX_JOBS               parallel compile jobs (read by torch's ninja build)
  VERA_EXT_DEBUG=1       -O0 -g host code, -G device code, no NDEBUG
  CUDA_HOME              the CUDA toolkit; default /usr/local/cuda when it exists, else torch's guess
"""

import glob
import importlib.util
import os
import runpy
import sys

from packaging.version import Version
from setuptools import setup

import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = Version("2.4")
# What is compiled: the one list of sources (also read by the emulated test builds).
SOURCES = runpy.run_path(os.path.join(ROOT, "csrc", "sources.py"))
DEFAULT_ARCHS = "8.0;9.0"


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
            raise SystemExit("vera_ext build: VERA_EXT_CUDA=1 but the CUDA part cannot be built: " + "; ".join(problems))
        return False, None, "; ".join(problems)
    return True, cuda_home, f"nvcc in {cuda_home} and torch built for CUDA {torch.version.cuda}"


def arch_list():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPU's arch (only to pick a default, never to decide
    whether CUDA is built); else a short list covering A100 and H100/H200."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs, "TORCH_CUDA_ARCH_LIST"
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}", "the visible GPU"
    except Exception:  # a broken driver must not break a CPU build
        pass
    return DEFAULT_ARCHS, "default"


def make_extension():
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
        log(f"building CPU+CUDA for archs {archs} (from {arch_source}); CUDA because {reason}"
            f"{'; debug build' if debug else ''}")
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext_cls = cpp_ext.CppExtension
        log(f"building CPU only, because {reason}{'; debug build' if debug else ''}")

    kwargs["extra_link_args"] = ["-fopenmp"] + (["-g"] if debug else [])
    return ext_cls("vera_ext._C", srcs, include_dirs=include_dirs, **kwargs)


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_ext.BuildExtension},
)
