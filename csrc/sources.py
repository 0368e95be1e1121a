"""Which source files are compiled into what: the one list that setup.py (the extension vera_ext._C), the emulated
test library (tests/emulated/emu_build.py) and the sanitizer program (tests/emulated/run_sanitizers.sh) all read.
Paths are relative to the repository root. A new source file is added here, and only here
(tests/test_sources.py fails on a file in csrc/ or tests/emulated/ that no list names).

    python csrc/sources.py GROUP     prints a group's files, one a line (for shell scripts)
"""

import sys

# Host C++ of the extension, always built: the op schemas, argument checks and the CPU backend.
EXTENSION = [
    "csrc/module.cpp",
    "csrc/ops.cpp",
    "csrc/common/checks.cpp",
    "csrc/cpu/claim_pool.cpp",
    "csrc/cpu/decode_cpu.cpp",
    "csrc/cpu/prims_cpu.cpp",
    "csrc/cpu/register_cpu.cpp",
]
# The CUDA kernels: nvcc in the extension; g++ with -DVERA_EMULATE_CUDA in the emulated builds.
KERNELS = [
    "csrc/cuda/decode_kernels.cu",
    "csrc/cuda/elementwise_kernels.cu",
    "csrc/cuda/merge_kernels.cu",
    "csrc/cuda/reduce_kernels.cu",
]
# Host C++ of the extension's CUDA part (launchers over the kernels, the CUDA dispatch registrations).
EXTENSION_CUDA = ["csrc/cuda/register_cuda.cpp"] + KERNELS

# Test-only kernels (never in the extension): the emulation's self-tests and the planted faults and waste.
TEST_KERNELS = [
    "tests/emulated/kernels/emu_selftest_kernels.cu",
    "tests/emulated/kernels/planted_faults.cu",
    "tests/emulated/kernels/planted_traffic.cu",
]
# The emulation of CUDA on host threads, its trace, and the self-test driver.
EMULATOR = [
    "tests/emulated/emu/emu_runtime.cpp",
    "tests/emulated/emu/emu_trace.cpp",
    "tests/emulated/kernels/emu_selftest.cpp",
]
# torch.ops.vera_emu: the emulated kernels with the extension's host code they run under.
EMULATED_LIBRARY = EMULATOR + [
    "tests/emulated/ext/emu_ops.cpp",
    "csrc/common/checks.cpp",
    "csrc/cpu/claim_pool.cpp",
    "csrc/cpu/decode_cpu.cpp",
    "csrc/cpu/prims_cpu.cpp",
]
# The sanitizer program (no torch): the emulated kernels against a reference, and the CPU decode's work claiming.
SANITIZER_PROGRAM = EMULATOR + [
    "csrc/cpu/claim_pool.cpp",
    "tests/emulated/sanitize/check_claim_pool.cpp",
    "tests/emulated/sanitize/check_kernels.cpp",
    "tests/emulated/sanitize/check_main.cpp",
]
# Include roots: csrc for everything, tests/emulated for the emulated builds ("emu/...", "kernels/...").
INCLUDE_DIRS = ["csrc"]
EMULATED_INCLUDE_DIRS = ["csrc", "tests/emulated"]

GROUPS = {
    "extension": EXTENSION,
    "extension_cuda": EXTENSION_CUDA,
    "kernels": KERNELS,
    "test_kernels": TEST_KERNELS,
    "emulated_library": EMULATED_LIBRARY,
    "sanitizer_program": SANITIZER_PROGRAM,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GROUPS:
        raise SystemExit(f"usage: python csrc/sources.py {{{'|'.join(GROUPS)}}}")
    print("\n".join(GROUPS[sys.argv[1]]))
