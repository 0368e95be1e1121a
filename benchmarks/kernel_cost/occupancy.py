"""Theoretical occupancy of a kernel launch on one SM, by the rules of CUDA's occupancy calculator.

The calculator's rules (cuda_occupancy.h, cudaOccMaxActiveBlocksPerMultiprocessor) for compute capability 9.0:
each of four per-SM resources allows some number of resident blocks, and the smallest wins. The figures come from
`h200.Gpu`; nothing here queries a device.
"""

from __future__ import annotations

from .h200 import H200, Gpu

# The limits in the order `limited_by` lists them.
LIMITS = ("registers", "shared memory", "threads", "blocks")


def _ceil_to(value: int, unit: int) -> int:
    """`value` rounded up to a multiple of `unit`."""
    return -(-value // unit) * unit


def occupancy(
    regs_per_thread: int, threads_per_block: int, static_smem: int = 0, dynamic_smem: int = 0, gpu: Gpu = H200
) -> dict:
    """Resident blocks and warps per SM for a kernel with these resources, launched with these block sizes.

    Returns a dict:
      blocks_per_sm   the smallest of the four limits; 0 when one block does not fit (e.g. 255 registers x 1024
                      threads: the launch itself fails with "too many resources requested for launch")
      warps_per_sm    blocks_per_sm x warps per block
      occupancy       warps_per_sm / max_warps_per_sm, in [0, 1]
      limited_by      the limits that give that minimum, all of them on a tie, in LIMITS order
      limits          {limit: blocks it allows}; "registers" is None when regs_per_thread is 0 (no limit)
      regs_per_warp   registers given to one warp (rounded up to the allocation unit)
      smem_per_block  shared memory given to one block (static + dynamic + the reserved 1 KiB, rounded up)

    Rules: registers go to warps in units of `reg_alloc_unit`, each warp's from one of the SM's
    `reg_sub_partitions` register files, so 4 x floor((65536 / 4) / regs_per_warp) warps fit (this is the
    calculator's rule; it can be a few warps below 65536 / regs_per_warp). Shared memory assumes the driver picks
    the largest carveout (228 KiB per SM), which it does when a kernel's blocks need it; a smaller carveout
    preference could only lower the shared-memory limit. Threads: max_threads_per_sm over whole warps per block.

    Raises ValueError for a launch that cannot be configured at all: threads_per_block outside 1..1024,
    regs_per_thread outside 0..max_regs_per_thread, negative shared memory, or static + dynamic shared memory over
    smem_per_block_max.
    """
    _check_launch(regs_per_thread, threads_per_block, static_smem, dynamic_smem, gpu)
    warps_per_block = -(-threads_per_block // 32)

    regs_per_warp = _ceil_to(regs_per_thread * 32, gpu.reg_alloc_unit)
    if regs_per_warp == 0:
        by_regs = None
    else:
        warps_per_partition = (gpu.regs_per_sm // gpu.reg_sub_partitions) // regs_per_warp
        by_regs = warps_per_partition * gpu.reg_sub_partitions // warps_per_block

    smem_per_block = _ceil_to(static_smem + dynamic_smem + gpu.smem_reserved_per_block, gpu.smem_alloc_unit)
    limits = {
        "registers": by_regs,
        "shared memory": gpu.smem_per_sm // smem_per_block,
        "threads": gpu.max_threads_per_sm // (warps_per_block * 32),
        "blocks": gpu.max_blocks_per_sm,
    }
    blocks = min(n for n in limits.values() if n is not None)
    warps = blocks * warps_per_block
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": warps,
        "occupancy": warps / gpu.max_warps_per_sm,
        "limited_by": [name for name in LIMITS if limits[name] == blocks],
        "limits": limits,
        "regs_per_warp": regs_per_warp,
        "smem_per_block": smem_per_block,
    }


def _check_launch(regs_per_thread: int, threads_per_block: int, static_smem: int, dynamic_smem: int, gpu: Gpu) -> None:
    """Raise ValueError, naming the limit, for a launch configuration no SM of `gpu` accepts."""
    if not 1 <= threads_per_block <= 1024:
        raise ValueError(f"threads_per_block must be in 1..1024 (the per-block limit), got {threads_per_block}")
    if not 0 <= regs_per_thread <= gpu.max_regs_per_thread:
        raise ValueError(
            f"regs_per_thread must be in 0..{gpu.max_regs_per_thread} (the per-thread limit), got {regs_per_thread}"
        )
    if static_smem < 0 or dynamic_smem < 0:
        raise ValueError(f"shared memory sizes must be >= 0, got static {static_smem}, dynamic {dynamic_smem}")
    if static_smem + dynamic_smem > gpu.smem_per_block_max:
        raise ValueError(
            f"static + dynamic shared memory {static_smem} + {dynamic_smem} = "
            f"{static_smem + dynamic_smem} bytes is over the per-block limit of "
            f"{gpu.smem_per_block_max} bytes"
        )
