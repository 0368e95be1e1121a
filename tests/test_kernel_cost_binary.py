"""benchmarks/kernel_cost: the H200's figures, occupancy by hand-worked cases, and the facts read from the binary.

The parsers run on canned text (fragments copied from this extension's cuobjdump output, or written by hand for a
loop shape); the tests on the built extension skip, at test time, when it has no sm_90 cubin or no cuobjdump is
found.
"""

import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from kernel_cost import binary, h200  # noqa: E402
from kernel_cost.occupancy import occupancy  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# h200


def test_every_field_has_one_source():
    fields = set(h200.to_json(h200.H200))
    assert fields == set(h200.SOURCES)
    assert all(h200.SOURCES[name].strip() for name in fields)


def test_to_json_lists_values_and_sources():
    row = h200.to_json(h200.H200)["hbm_bytes_per_s"]
    assert row == {"value": 4.3e12, "source": h200.SOURCES["hbm_bytes_per_s"]}


def test_l1_bandwidth_is_derived():
    # 128 B/clk/SM x 132 SMs x 1.98e9 clk/s = 33.45e12 B/s
    assert h200.H200.l1_bytes_per_s == pytest.approx(33.45408e12)


def test_with_overrides_replaces_only_the_named_fields():
    gpu = h200.with_overrides(h200.H200, {"hbm_bytes_per_s": 4, "sms": 66})
    assert gpu.hbm_bytes_per_s == 4.0 and isinstance(gpu.hbm_bytes_per_s, float)
    assert gpu.sms == 66
    assert gpu.clock_ghz == h200.H200.clock_ghz
    assert h200.H200.sms == 132  # the original is untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hbm_bandwidth": 1.0}, "unknown GPU field 'hbm_bandwidth'"),
        ({"sms": 132.0}, "'sms' expects a int"),
        ({"dram_latency_ns": "600"}, "'dram_latency_ns' expects a float"),
        ({"host_sync_us": True}, "'host_sync_us' expects a float"),
    ],
)
def test_with_overrides_rejects(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        h200.with_overrides(h200.H200, overrides)


# ---------------------------------------------------------------------------------------------------------------
# occupancy


def test_occupancy_registers_128():
    # 128 regs x 32 lanes = 4096 regs per warp; 65536 / 4 sub-partitions = 16384 -> 4 warps each, 16 per SM;
    # 16 warps / 8 warps per block = 2 blocks (threads would allow 2048 / 256 = 8)
    occ = occupancy(128, 256)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (2, 16, 0.25)
    assert occ["limited_by"] == ["registers"]
    assert occ["regs_per_warp"] == 4096


def test_occupancy_registers_32_tie_with_threads():
    # 32 x 32 = 1024 regs per warp -> 16 per sub-partition, 64 warps = 8 blocks of 8 warps;
    # threads: 2048 / 256 = 8 blocks. A tie: both are listed, registers first.
    occ = occupancy(32, 256)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (8, 64, 1.0)
    assert occ["limited_by"] == ["registers", "threads"]


def test_occupancy_registers_64():
    # 64 x 32 = 2048 regs per warp -> 8 per sub-partition, 32 warps = 4 blocks of 8 warps; 32 / 64 = 0.5
    occ = occupancy(64, 256)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (4, 32, 0.5)
    assert occ["limited_by"] == ["registers"]


def test_occupancy_threads():
    # 22 x 32 = 704 -> 768 regs per warp (units of 256); 16384 / 768 = 21 per sub-partition, 84 warps = 10 blocks;
    # threads: 2048 / 256 = 8 blocks
    occ = occupancy(22, 256)
    assert occ["limits"] == {"registers": 10, "shared memory": 228, "threads": 8, "blocks": 32}
    assert (occ["blocks_per_sm"], occ["occupancy"], occ["limited_by"]) == (8, 1.0, ["threads"])


def test_occupancy_shared_memory():
    # 48 KiB static + 1 KiB reserved = 50176 bytes (392 x 128); 233472 / 50176 = 4.65 -> 4 blocks;
    # registers: 1024 per warp -> 64 warps = 16 blocks of 4 warps; threads: 2048 / 128 = 16
    occ = occupancy(32, 128, static_smem=48 * 1024)
    assert occ["smem_per_block"] == 50176
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (4, 16, 0.25)
    assert occ["limited_by"] == ["shared memory"]


def test_occupancy_shared_memory_rounds_up():
    # 1000 dynamic + 1024 reserved = 2024 -> 2048 (units of 128); 233472 / 2048 = 114 blocks, so blocks (32) win
    occ = occupancy(32, 64, dynamic_smem=1000)
    assert occ["smem_per_block"] == 2048
    assert occ["limits"]["shared memory"] == 114


def test_occupancy_block_limit():
    # 8 x 32 = 256 regs per warp -> 64 per sub-partition, 256 one-warp blocks; threads: 2048 / 32 = 64;
    # 32 blocks per SM at most -> 32 warps, 0.5
    occ = occupancy(8, 32)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (32, 32, 0.5)
    assert occ["limited_by"] == ["blocks"]


def test_occupancy_counts_registers_per_sub_partition():
    # 40 x 32 = 1280 regs per warp: 16384 / 1280 = 12 per sub-partition, 48 warps = 24 blocks of 2 warps
    # (65536 / 1280 = 51 warps would say 25); threads: 2048 / 64 = 32
    occ = occupancy(40, 64)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (24, 48, 0.75)


def test_occupancy_zero_registers_is_no_limit():
    occ = occupancy(0, 256)
    assert occ["limits"]["registers"] is None
    assert (occ["blocks_per_sm"], occ["limited_by"]) == (8, ["threads"])


def test_occupancy_launch_that_cannot_fit_reports_zero():
    # 255 x 32 = 8160 -> 8192 regs per warp: 16384 / 8192 = 2 per sub-partition, 8 warps, under one block of 32
    # warps: 0 blocks (the launch fails with "too many resources requested for launch")
    occ = occupancy(255, 1024)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["occupancy"]) == (0, 0, 0.0)
    assert occ["limited_by"] == ["registers"]


def test_occupancy_largest_shared_memory_block_fits_once():
    # 232448 + 1024 reserved = 233472 = all of the SM's shared memory
    assert occupancy(32, 256, dynamic_smem=232448)["blocks_per_sm"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        ((32, 0), "threads_per_block must be in 1..1024"),
        ((32, 1025), "threads_per_block must be in 1..1024"),
        ((256, 256), "regs_per_thread must be in 0..255"),
        ((32, 256, 48 * 1024, 184 * 1024), "over the per-block limit of 232448 bytes"),
        ((32, 256, -1), "shared memory sizes must be >= 0"),
    ],
)
def test_occupancy_rejects_impossible_launches(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        occupancy(*args)


# ---------------------------------------------------------------------------------------------------------------
# kernel_key


@pytest.mark.parametrize(
    "demangled, key",
    [
        (
            "void vera::cuda::(anonymous namespace)::decode_y_kernel<__nv_bfloat16>(vera::cuda::DecodeParams, bool, bool)",
            "decode_y_kernel<__nv_bfloat16>",
        ),
        (
            "void vera::cuda::(anonymous namespace)::merge_kernel<float, true>(vera::cuda::MergeParams)",
            "merge_kernel<float, true>",
        ),
        (
            "vera::cuda::(anonymous namespace)::col_dot_finish_kernel(vera::cuda::ColDotReduceParams)",
            "col_dot_finish_kernel",
        ),
        # gcc's __PRETTY_FUNCTION__ spelling of the same names
        ("vera::cuda::{anonymous}::decode_y_kernel<__nv_bfloat16>", "decode_y_kernel<__nv_bfloat16>"),
        ("vera::cuda::{anonymous}::merge_kernel<float, true>", "merge_kernel<float, true>"),
        # spacing is normalised; qualified template arguments keep their qualifiers
        ("vera::cuda::merge_kernel< float ,true >", "merge_kernel<float, true>"),
        ("void ns::k<ns::Tag<int>, 4>(ns::P)", "k<ns::Tag<int>, 4>"),
    ],
)
def test_kernel_key(demangled, key):
    assert binary.kernel_key(demangled) == key


def test_kernel_key_rejects_what_is_no_name():
    with pytest.raises(ValueError, match="cannot read a kernel name"):
        binary.kernel_key("  ")


# ---------------------------------------------------------------------------------------------------------------
# parse_resource_usage, parse_sass (fragments of this extension's cuobjdump output)

RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/cuda/decode_kernels.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN4vera4cuda50_GLOBAL__N__d7d797d9_17_decode_kernels_cu_1292acf015decode_y_kernelI13__nv_bfloat16EEvNS0_12DecodeParamsEbb:
  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:706 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN4vera4cuda50_GLOBAL__N__d7d797d9_17_decode_kernels_cu_1292acf015decode_u_kernelI13__nv_bfloat16EEvNS0_12DecodeParamsEb:
  REG:64 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:705 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/cuda/reduce_kernels.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN4vera4cuda50_GLOBAL__N__35455619_17_reduce_kernels_cu_6cd7023a21col_dot_finish_kernelENS0_18ColDotReduceParamsE:
  REG:32 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""  # (the STACK:16 and LOCAL:8 are edited in: this build spills nowhere)


def test_parse_resource_usage():
    kernels = binary.parse_resource_usage(RESOURCE_USAGE)
    assert [(k["source_file"], k["arch"], k["registers"], k["static_shared_bytes"]) for k in kernels] == [
        ("decode_kernels.cu", "sm_90", 128, 0),
        ("decode_kernels.cu", "sm_90", 64, 2048),
        ("reduce_kernels.cu", "sm_90", 32, 0),
    ]
    assert kernels[1]["mangled"].endswith("15decode_u_kernelI13__nv_bfloat16EEvNS0_12DecodeParamsEb")
    assert [k["spills"] for k in kernels] == [False, False, True]
    assert (kernels[2]["stack_bytes"], kernels[2]["local_bytes"]) == (16, 8)


def test_parse_resource_usage_needs_the_resource_line():
    with pytest.raises(ValueError, match="expected a 'REG:.. STACK:.. SHARED:.. LOCAL:..' line after Function f"):
        binary.parse_resource_usage(" Function f:\n Function g:\n  REG:1 STACK:0 SHARED:0 LOCAL:0\n")


SASS = """
\t\tFunction : _ZN4vera4cuda50_GLOBAL__N__d7d797d9_17_decode_kernels_cu_1292acf015decode_y_kernelI13__nv_bfloat16EEvNS0_12DecodeParamsEbb
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0740*/                   LEA.HI.X R59, R28, UR15, R29, 0x1, P3 ;                 /* 0x0000000f1c3b7c11 */
                                                                                           /* 0x000fe200098f0c1d */
        /*0750*/              @!P1 BRA 0x3c00 ;                                            /* 0x0000003400289947 */
                                                                                           /* 0x000ff40003800000 */
        /*0780*/                   LDG.E.128 R28, desc[UR10][R58.64] ;                     /* 0x0000000a3a1c7981 */
                                                                                           /* 0x000ea8000c1e1d00 */
        /*0790*/                   LDG.E.128 R32, desc[UR10][R64.64] ;                     /* 0x0000000a40207981 */
                                                                                           /* 0x000ee2000c1e1d00 */
\t\tFunction : _ZN4vera4cuda55_GLOBAL__N__074debb4_22_elementwise_kernels_cu_242c0d5216row_scale_kernelI13__nv_bfloat16S3_EEvNS0_14RowScaleParamsE
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*04d0*/                   STG.E.U16 desc[UR10][R6.64], R9 ;                     /* 0x0000000906007986 */
                                                                                         /* 0x0001e4000c10150a */
        /*0510*/              @!P0 BRA 0x1e0 ;                                           /* 0xfffffffc00308947 */
                                                                                         /* 0x001fea000383ffff */
        /*0520*/                   BSYNC B0 ;                                            /* 0x0000000000007941 */
                                                                                         /* 0x000fea0003800000 */
        /*0530*/                   EXIT ;                                                /* 0x000000000000794d */
                                                                                         /* 0x000fea0003800000 */
"""


def test_parse_sass():
    functions = binary.parse_sass(SASS)
    decode, scale = functions.values()
    assert list(functions)[0].endswith("decode_y_kernelI13__nv_bfloat16EEvNS0_12DecodeParamsEbb")
    assert decode == [
        binary.Instr(0x740, None, "LEA.HI.X", "R59, R28, UR15, R29, 0x1, P3"),
        binary.Instr(0x750, "!P1", "BRA", "0x3c00"),
        binary.Instr(0x780, None, "LDG.E.128", "R28, desc[UR10][R58.64]"),
        binary.Instr(0x790, None, "LDG.E.128", "R32, desc[UR10][R64.64]"),
    ]
    assert scale[-1] == binary.Instr(0x530, None, "EXIT", "")
    assert binary.count_wide_loads(decode)["loads"] == {1: 0, 2: 0, 4: 0, 8: 0, 16: 2}
    assert binary.count_wide_loads(scale)["stores"] == {1: 0, 2: 1, 4: 0, 8: 0, 16: 0}


def test_parse_sass_rejects_a_function_listed_twice():
    with pytest.raises(ValueError, match="appears twice"):
        binary.parse_sass("\t\tFunction : f\n\t\tFunction : f\n")


# ---------------------------------------------------------------------------------------------------------------
# count_wide_loads, load_batches on handwritten SASS


def function(*lines):
    """The instructions of a one-function listing written as (address, instruction) pairs, in cuobjdump's layout."""
    body = "\n".join(f"        /*{address:04x}*/                   {text} ;" for address, text in lines)
    return binary.parse_sass("\t\tFunction : k\n" + body)["k"]


def test_count_wide_loads_by_suffix():
    instrs = function(
        (0x00, "LDG.E.U8 R1, desc[UR4][R2.64]"),
        (0x10, "LDG.E.S16 R1, desc[UR4][R2.64]"),
        (0x20, "LDG.E R1, desc[UR4][R2.64]"),
        (0x30, "LDG.E.CONSTANT R1, desc[UR4][R2.64]"),
        (0x40, "LDG.E.64 R4, desc[UR4][R2.64]"),
        (0x50, "LDG.E.LTC128B.128 R4, desc[UR4][R2.64]"),  # LTC128B is a cache hint, not a width
        (0x60, "LDS.128 R4, [R2]"),  # shared memory: not counted
        (0x70, "STG.E.128 desc[UR4][R2.64], R4"),
        (0x80, "STG.E desc[UR4][R2.64], R4"),
    )
    assert binary.count_wide_loads(instrs) == {
        "loads": {1: 1, 2: 1, 4: 2, 8: 1, 16: 1},
        "stores": {1: 0, 2: 0, 4: 1, 8: 0, 16: 1},
    }


def test_load_batches_independent_loads_are_one_batch():
    instrs = function(
        (0x00, "MOV R2, c[0x0][0x210]"),
        (0x10, "LDG.E.128 R4, desc[UR4][R2.64]"),
        (0x20, "LDG.E.128 R8, desc[UR4][R2.64+0x10]"),
        (0x30, "LDG.E.128 R12, desc[UR4][R2.64+0x20]"),
        (0x40, "LDG.E.128 R16, desc[UR4][R2.64+0x30]"),
        (0x50, "FFMA R20, R4, R8, R20"),  # waits once: all four arrive together
        (0x60, "FFMA R20, R12, R16, R20"),
        (0x70, "IADD3 R2, P0, R2, 0x40, RZ"),
        (0x80, "@P1 BRA 0x10"),
        (0x90, "EXIT"),
    )
    # 4 loads x 16 bytes = 64 bytes per lane in 1 batch: 32 lanes x 64 = 2048 bytes in flight per warp
    assert binary.load_batches(instrs) == {
        "loops": [{"start": 0x10, "end": 0x80, "loads": 4, "bytes_per_lane": 64, "batches": 1}],
        "bytes_per_lane": 64,
        "batches": 1,
        "bytes_in_flight_per_warp": 2048.0,
    }


def test_load_batches_dependent_loads_are_two_batches():
    instrs = function(
        (0x00, "LDG.E R16, desc[UR4][R2.64]"),
        (0x10, "FFMA R20, R16, R16, R20"),  # wait 1
        (0x20, "LDG.E R16, desc[UR4][R2.64+0x4]"),
        (0x30, "FFMA R20, R16, R16, R20"),  # wait 2
        (0x40, "@P0 BRA 0x0"),
        (0x50, "EXIT"),
    )
    result = binary.load_batches(instrs)
    # 2 x 4 bytes per lane in 2 batches: 32 x 8 / 2 = 128 bytes in flight per warp
    assert (result["batches"], result["bytes_per_lane"], result["bytes_in_flight_per_warp"]) == (2, 8, 128.0)


def test_load_batches_use_of_a_wide_load_or_its_store_waits():
    instrs = function(
        (0x00, "LDG.E.128 R4, desc[UR4][R2.64]"),
        (0x10, "FADD R20, R7, R20"),  # R7 is the last register of R4..R7: wait 1
        (0x20, "LDG.E.128 R8, desc[UR4][R2.64+0x10]"),
        (0x30, "STG.E.128 desc[UR4][R12.64], R8"),  # stores R8..R11: wait 2
        (0x40, "LDG.E.64 R4, desc[UR4][R2.64+0x20]"),
        (0x50, "@P0 BRA 0x0"),  # R4..R5 still in flight: one more batch
        (0x60, "EXIT"),
    )
    assert binary.load_batches(instrs)["loops"][0]["batches"] == 3


def test_load_batches_ignore_the_jump_back_from_out_of_line_code():
    # BRA.DIV sends a divergent warp to an out-of-line shuffle (0x80), which jumps back to 0x20: a backward branch
    # that closes no loop (0x20 does not dominate 0xb0). The one loop is 0x0..0x50 plus that out-of-line block.
    instrs = function(
        (0x00, "BRA.DIV UR6, 0x80"),
        (0x10, "SHFL.BFLY PT, R5, R10, 0x1, 0x1f"),
        (0x20, "LDG.E R4, desc[UR4][R2.64]"),
        (0x30, "FADD R10, R4, R5"),
        (0x40, "IADD3 R2, R2, 0x4, RZ"),
        (0x50, "@P0 BRA 0x0"),
        (0x60, "EXIT"),
        (0x70, "BRA 0x70"),
        (0x80, "WARPSYNC.COLLECTIVE R7, 0xa0"),
        (0x90, "SHFL.BFLY P1, R5, R10, R8, R9"),
        (0xA0, "ENDCOLLECTIVE"),
        (0xB0, "BRA 0x20"),
    )
    result = binary.load_batches(instrs)
    assert result["loops"] == [{"start": 0x0, "end": 0xB0, "loads": 1, "bytes_per_lane": 4, "batches": 1}]


def test_load_batches_innermost_loop_with_loads():
    # an outer loop 0x0..0x60 around an inner one 0x10..0x40: only the inner one is walked
    instrs = function(
        (0x00, "LDG.E R30, desc[UR4][R40.64]"),
        (0x10, "LDG.E.64 R4, desc[UR4][R2.64]"),
        (0x20, "FADD R10, R4, R5"),
        (0x30, "IADD3 R2, R2, 0x8, RZ"),
        (0x40, "@P0 BRA 0x10"),
        (0x50, "FADD R10, R10, R30"),
        (0x60, "@P1 BRA 0x0"),
        (0x70, "EXIT"),
    )
    result = binary.load_batches(instrs)
    assert [(r["start"], r["end"], r["bytes_per_lane"]) for r in result["loops"]] == [(0x10, 0x40, 8)]


def test_load_batches_without_a_loop_walks_the_function():
    instrs = function(
        (0x00, "LDG.E R4, desc[UR4][R2.64]"),
        (0x10, "LDG.E R5, desc[UR4][R2.64+0x4]"),
        (0x20, "FADD R6, R4, R5"),
        (0x30, "EXIT"),
    )
    result = binary.load_batches(instrs)
    assert result["loops"] == [{"start": 0x0, "end": 0x30, "loads": 2, "bytes_per_lane": 8, "batches": 1}]
    assert result["bytes_in_flight_per_warp"] == 256.0


def test_load_batches_without_loads():
    instrs = function((0x00, "FADD R6, R4, R5"), (0x10, "@P0 BRA 0x0"), (0x20, "EXIT"))
    assert binary.load_batches(instrs) == {
        "loops": [],
        "bytes_per_lane": 0,
        "batches": 0,
        "bytes_in_flight_per_warp": 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------
# find_cuobjdump


def test_find_cuobjdump_honours_the_variable(monkeypatch, tmp_path):
    tool = tmp_path / "cuobjdump"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CUOBJDUMP", str(tool))
    assert binary.find_cuobjdump() == str(tool)
    monkeypatch.setenv("CUOBJDUMP", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not an executable file"):
        binary.find_cuobjdump()


def test_find_cuobjdump_says_where_it_looked(monkeypatch):
    monkeypatch.delenv("CUOBJDUMP", raising=False)
    monkeypatch.setenv("CUDA_HOME", "/opt/no-cuda")
    monkeypatch.setattr(binary.shutil, "which", lambda name: None)
    monkeypatch.setattr(binary, "_is_executable", lambda path: False)
    with pytest.raises(FileNotFoundError) as error:
        binary.find_cuobjdump()
    message = str(error.value)
    for place in (
        "cuobjdump on PATH",
        "/opt/no-cuda/bin/cuobjdump",
        "/usr/local/cuda/bin/cuobjdump",
        "pip install nvidia-cuda-cuobjdump",
        "CUOBJDUMP",
    ):
        assert place in message


# ---------------------------------------------------------------------------------------------------------------
# The built extension (skipped without sm_90 cubins or a cuobjdump)


@pytest.fixture(scope="module")
def built():
    """(the extension's path, cuobjdump's path, kernel_facts of its sm_90 cubins); skips when there are none."""
    try:
        tool, so = binary.find_cuobjdump(), binary.extension_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        binary.resource_usage(so, tool, arch="sm_90")
    except ValueError as exc:
        pytest.skip(f"no sm_90 kernels to read: {exc}")
    return so, tool, binary.kernel_facts(so, tool, arch="sm_90")


def test_built_kernels_resources(built):
    so, tool, facts = built
    listing = subprocess.run(
        [tool, "--dump-resource-usage", "-arch", "sm_90", so], capture_output=True, text=True, check=True
    ).stdout
    direct = {name: int(regs) for name, regs in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", listing)}
    assert len(facts) == len(direct)  # one key per kernel: kernel_facts raises on a shared key
    assert {k["mangled"]: k["registers"] for k in facts.values()} == direct
    for key, kernel in facts.items():
        assert kernel["registers"] > 0, key
        assert isinstance(kernel["spills"], bool), key
        assert kernel["arch"] == "sm_90"


def test_built_decode_kernel_uses_16_byte_loads(built):
    # the 16-byte instantiation of row bucket 16 (decode_kernels.cu); its element-wise twin has no 16-byte load
    kernel = built[2]["decode_y_kernel<__nv_bfloat16, 16, true>"]
    assert kernel["source_file"] == "decode_kernels.cu"
    assert kernel["demangled"].startswith("void vera::cuda::(anonymous namespace)::decode_y_kernel<")
    assert kernel["widths"]["loads"][16] >= 1
    assert kernel["load_batches"]["bytes_in_flight_per_warp"] > 0
    assert built[2]["decode_y_kernel<__nv_bfloat16, 32, false>"]["widths"]["loads"][16] == 0
