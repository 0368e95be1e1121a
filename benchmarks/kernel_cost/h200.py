"""The cost model's figures for one GPU, the H200 SXM, each with where it comes from.

Every figure is one of three kinds, and its source says which:
  datasheet    NVIDIA's published peak or a documented hardware limit of compute capability 9.0;
  measured     what others measured on an H200 (not on this project's machine);
  estimate     an order of magnitude, to be replaced by what the first GPU run measures.
A GPU run replaces figures with `with_overrides` (e.g. from a JSON file of its measurements); `to_json` lists them
with their sources for the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Field name -> where its figure comes from. Kept beside the dataclass (not in field metadata) so the report can
# print it as is; a test checks that every field has exactly one entry.
SOURCES = {
    "name": "the part this model describes: H200 SXM, compute capability 9.0 (sm_90)",
    "sms": "datasheet: 132 SMs enabled on the SXM part of GH100",
    "clock_ghz": "datasheet: 1.98 GHz maximum boost clock; a long run under load may clock lower",
    "hbm_bytes_per_s": "measured by others on an H200: a device-to-device copy, bytes read plus bytes written per "
    "second (about 90% of the datasheet peak); the rate a streaming kernel can hope for",
    "hbm_peak_bytes_per_s": "datasheet: 4.8 TB/s HBM3e peak",
    "l2_bytes": "60 MB, the L2 size PyTorch's device properties report for an H200 (L2_cache_size); check it "
    "with torch.cuda.get_device_properties on the first GPU run",
    "l2_bytes_per_s": "estimate: order of magnitude of the L2 hit bandwidth across all SMs; calibrate",
    "l1_bytes_per_clk_per_sm": "datasheet: the L1/shared-memory data path returns 128 bytes per clock per SM "
    "(32 banks of 4 bytes)",
    "l2_latency_ns": "estimate: public microbenchmarks put an L2 hit on Hopper at roughly 250-300 cycles at "
    "boost clock (~150 ns), more for the far partition; to be calibrated by the first GPU run",
    "dram_latency_ns": "estimate: public microbenchmarks put an HBM load's latency on Hopper at roughly a "
    "thousand cycles or more; calibrate",
    "fp32_flops_per_s": "datasheet: 67 TFLOP/s FP32 on the CUDA cores",
    "bf16_tensor_flops_per_s": "datasheet: 989 TFLOP/s dense BF16 on the tensor cores (the datasheet's 1979 "
    "assumes 2:4 sparsity)",
    "cublas_bf16_flops_per_s": "estimate: what cuBLAS is assumed to sustain on large BF16 GEMMs; others "
    "measured about 788 TFLOP/s on an H200 at 8192x8192x8192",
    "cublas_fp32_flops_per_s": "estimate: SGEMM without TF32 runs on the CUDA cores; assumed about 75% of "
    "their peak; calibrate",
    "kernel_overhead_us": "estimate: what one more dependent kernel on a stream adds (launch, ramp-up, drain "
    "of the previous one), order of magnitude; calibrate",
    "host_sync_us": "estimate: a device-to-host copy that synchronizes (e.g. .item()), order of magnitude; calibrate",
    "regs_per_sm": "datasheet: 64K 32-bit registers per SM (CUDA programming guide, compute capability 9.0)",
    "max_regs_per_thread": "datasheet: 255 registers per thread at most (compute capability 9.0)",
    "reg_alloc_unit": "CUDA occupancy calculator: registers are given to a warp in units of 256",
    "reg_sub_partitions": "CUDA occupancy calculator (cuda_occupancy.h): an SM's registers are split over 4 "
    "sub-partitions and a warp's registers come from one of them",
    "max_threads_per_sm": "datasheet: 2048 resident threads per SM (compute capability 9.0)",
    "max_warps_per_sm": "datasheet: 64 resident warps per SM (compute capability 9.0)",
    "max_blocks_per_sm": "datasheet: 32 resident blocks per SM (compute capability 9.0)",
    "smem_per_sm": "datasheet: 228 KiB of shared memory per SM at the largest carveout (compute capability 9.0)",
    "smem_per_block_max": "datasheet: 227 KiB of shared memory per block at most, with opt-in (compute capability 9.0)",
    "smem_reserved_per_block": "datasheet: the system reserves 1 KiB of shared memory per block "
    "(compute capability 8.0 and later)",
    "smem_alloc_unit": "CUDA occupancy calculator: shared memory is given to a block in units of 128 bytes "
    "(compute capability 9.0)",
}


@dataclass(frozen=True)
class Gpu:
    """One GPU's figures for the cost model. Each comment gives the unit and the kind of figure (datasheet,
    measured by others, estimate); `SOURCES` says where it comes from."""

    name: str
    # Throughput and latency
    sms: int  # datasheet
    clock_ghz: float  # datasheet, maximum boost
    hbm_bytes_per_s: float  # measured by others: bytes read + written per second by a copy; the model's DRAM rate
    hbm_peak_bytes_per_s: float  # datasheet peak, for the report only
    l2_bytes: int  # as PyTorch reports it
    l2_bytes_per_s: float  # estimate
    l1_bytes_per_clk_per_sm: int  # datasheet
    dram_latency_ns: float  # estimate
    l2_latency_ns: float  # estimate
    fp32_flops_per_s: float  # datasheet peak, CUDA cores
    bf16_tensor_flops_per_s: float  # datasheet peak, dense
    cublas_bf16_flops_per_s: float  # estimate, near what others measured
    cublas_fp32_flops_per_s: float  # estimate
    # Fixed costs, microseconds
    kernel_overhead_us: float  # estimate
    host_sync_us: float  # estimate
    # Per-SM limits of compute capability 9.0 (occupancy): documented limits and the occupancy calculator's units
    regs_per_sm: int
    max_regs_per_thread: int
    reg_alloc_unit: int  # registers per warp are allocated in multiples of this
    reg_sub_partitions: int  # a warp's registers come from one of these equal parts of regs_per_sm
    max_threads_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # bytes, at the largest carveout
    smem_per_block_max: int  # bytes, static + dynamic, with opt-in
    smem_reserved_per_block: int  # bytes the system takes from each block's share
    smem_alloc_unit: int  # bytes; a block's shared memory is allocated in multiples of this

    @property
    def l1_bytes_per_s(self) -> float:
        """Aggregate L1/shared bandwidth of all SMs at the boost clock (about 33.5 TB/s on the H200)."""
        return self.l1_bytes_per_clk_per_sm * self.sms * self.clock_ghz * 1e9


H200 = Gpu(
    name="NVIDIA H200 SXM (sm_90)",
    sms=132,
    clock_ghz=1.98,
    hbm_bytes_per_s=4.3e12,
    hbm_peak_bytes_per_s=4.8e12,
    l2_bytes=60_000_000,
    l2_bytes_per_s=10e12,
    l1_bytes_per_clk_per_sm=128,
    dram_latency_ns=600.0,
    l2_latency_ns=200.0,
    fp32_flops_per_s=67e12,
    bf16_tensor_flops_per_s=989e12,
    cublas_bf16_flops_per_s=750e12,
    cublas_fp32_flops_per_s=50e12,
    kernel_overhead_us=2.0,
    host_sync_us=10.0,
    regs_per_sm=65536,
    max_regs_per_thread=255,
    reg_alloc_unit=256,
    reg_sub_partitions=4,
    max_threads_per_sm=2048,
    max_warps_per_sm=64,
    max_blocks_per_sm=32,
    smem_per_sm=233472,
    smem_per_block_max=232448,
    smem_reserved_per_block=1024,
    smem_alloc_unit=128,
)


def to_json(gpu: Gpu) -> dict:
    """{field: {"value": ..., "source": ...}} for every field of `gpu`, in declaration order."""
    return {f.name: {"value": getattr(gpu, f.name), "source": SOURCES[f.name]} for f in dataclasses.fields(gpu)}


def with_overrides(gpu: Gpu, overrides: dict) -> Gpu:
    """A copy of `gpu` with the fields named in `overrides` replaced (e.g. figures a GPU run measured).

    Raises ValueError for a name that is not a field, or a value of the wrong kind: a str for the name, an int for
    the counts and limits, a number for the rates and times (stored as a float).
    """
    fields = [f.name for f in dataclasses.fields(gpu)]
    checked = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown GPU field {key!r} in overrides; expected one of: {', '.join(fields)}")
        checked[key] = _checked(key, type(getattr(gpu, key)), value)
    return dataclasses.replace(gpu, **checked)


def _checked(key: str, kind: type, value):
    """`value` as the type `kind` of field `key`; ValueError when it cannot stand for one."""
    if kind is str and isinstance(value, str):
        return value
    if isinstance(value, bool):  # an int to Python, never a figure
        raise ValueError(f"GPU field {key!r} expects a {kind.__name__}, got {value!r}")
    # A count or a limit must be a whole int: 132.0 would leak floats into the occupancy arithmetic.
    if kind is int and isinstance(value, int):
        return value
    # JSON may spell a whole rate without a decimal point.
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"GPU field {key!r} expects a {kind.__name__}, got {value!r}")
