"""Which emulated tests run each __global__ kernel (of csrc/ and tests/emulated/kernels/): the one place to update
when a kernel is added.

test_emu_kernel_coverage.py fails when a kernel is missing here, when an entry names a kernel that no
longer exists, or when a listed test does not exist. Entries are "test file::test function" in tests/emulated.
"""

BLOCK_ORDER = "test_emu_block_order.py::test_results_do_not_depend_on_block_order"
SELFTEST = "test_emu_runtime.py::test_emulation_selftest"

KERNEL_TESTS = {
    # csrc/cuda/elementwise_kernels.cu
    "row_scale_kernel": [
        "test_emu_elementwise.py::test_row_scale",
        "test_emu_elementwise.py::test_row_scale_two_grid_passes",
        BLOCK_ORDER,
    ],
    "col_scale_kernel": [
        "test_emu_elementwise.py::test_col_scale",
        "test_emu_elementwise.py::test_col_scale_two_grid_passes",
        BLOCK_ORDER,
    ],
    "scale_add_kernel": [
        "test_emu_elementwise.py::test_scale_add",
        "test_emu_elementwise.py::test_scale_add_two_grid_passes",
        BLOCK_ORDER,
    ],
    # csrc/cuda/reduce_kernels.cu
    "col_dot_partial_kernel": [
        "test_emu_reduce.py::test_col_dot_reduce",
        "test_emu_reduce.py::test_col_dot_reduce_forced_splits",
        BLOCK_ORDER,
    ],
    "col_dot_finish_kernel": [  # runs when there is more than one row split
        "test_emu_reduce.py::test_col_dot_reduce",
        "test_emu_reduce.py::test_col_dot_reduce_forced_splits",
        "test_emu_reduce.py::test_col_dot_reduce_split_count_does_not_change_much",
        BLOCK_ORDER,
    ],
    "lambda_grads_partial_kernel": ["test_emu_reduce.py::test_lambda_grads", BLOCK_ORDER],
    "lambda_grads_finish_kernel": ["test_emu_reduce.py::test_lambda_grads", BLOCK_ORDER],
    "max_abs_partial_kernel": [
        "test_emu_reduce.py::test_max_abs",
        "test_emu_reduce.py::test_max_abs_sees_nan_and_inf",
        "test_emu_merge.py::test_safe_merge_bound_reads_each_operand_once",
        BLOCK_ORDER,
    ],
    "max_abs_finish_kernel": [
        "test_emu_reduce.py::test_max_abs",
        "test_emu_reduce.py::test_max_abs_sees_nan_and_inf",
        BLOCK_ORDER,
    ],
    # csrc/cuda/merge_kernels.cu (the fused tile GEMM + merge; both template modes: write and check-only; every
    # weight x projection dtype pair)
    "merge_kernel": [
        "test_emu_merge.py::test_merge",
        "test_emu_merge.py::test_merge_projection_dtype_other_than_weight",
        "test_emu_merge.py::test_merge_unaligned_slices_take_the_element_path",
        "test_emu_merge.py::test_merge_column_major_weight",
        "test_emu_merge.py::test_merge_check_only",
        "test_emu_merge.py::test_merge_check_only_sees_overflow_in_the_weight_dtype",
        BLOCK_ORDER,
    ],
    # csrc/cuda/decode_kernels.cu (every row bucket NB and both paths, 16-byte and element-wise)
    "decode_u_kernel": [
        "test_emu_decode.py::test_decode",
        "test_emu_decode.py::test_decode_mixed_adapters",
        "test_emu_decode.py::test_decode_mixed_adapters_read_only_the_rows_lambdas",
        "test_emu_decode.py::test_decode_unaligned_slices",
        "test_emu_decode.py::test_decode_picks_the_bucket_and_the_16_byte_path",
        "test_emu_decode.py::test_decode_with_a_base_streams_b_alone",
        "test_emu_decode.py::test_decode_zero_rows_launches_nothing",
        BLOCK_ORDER,
    ],
    "decode_y_kernel": [
        "test_emu_decode.py::test_decode",
        "test_emu_decode.py::test_decode_mixed_adapters",
        "test_emu_decode.py::test_decode_mixed_adapters_read_only_the_rows_lambdas",
        "test_emu_decode.py::test_decode_unaligned_slices",
        "test_emu_decode.py::test_decode_picks_the_bucket_and_the_16_byte_path",
        "test_emu_decode.py::test_decode_with_a_base_streams_b_alone",
        "test_emu_decode.py::test_decode_zero_rows_launches_nothing",
        BLOCK_ORDER,
    ],
    # tests/emulated/kernels/emu_selftest_kernels.cu: the emulation's own self-tests and the misuses it must refuse
    "warp_ops_kernel": [SELFTEST],
    "dynamic_shared_kernel": [SELFTEST],
    "big_dynamic_shared_kernel": [SELFTEST],
    "atomics_kernel": [SELFTEST],
    "vector_loads_kernel": [SELFTEST],
    "indexing_3d_kernel": [SELFTEST],
    "partial_mask_kernel": [SELFTEST],
    "missing_lane_kernel": [SELFTEST],
    "warp_divergence_kernel": [SELFTEST],
    "bad_block_kernel": [SELFTEST],
    # tests/emulated/kernels/planted_faults.cu: deliberate bugs the safety nets must catch
    "planted_oob_write_kernel": ["test_emu_sanitizers.py::test_asan_catches_planted_out_of_bounds_write"],
    "planted_shared_oob_kernel": ["test_emu_sanitizers.py::test_asan_catches_planted_shared_memory_overflow"],
    "planted_missing_sync_kernel": ["test_emu_sanitizers.py::test_tsan_catches_planted_missing_syncthreads"],
    "planted_divergent_barrier_kernel": [SELFTEST],  # the "misuse" self-test
    # tests/emulated/kernels/planted_traffic.cu: deliberate memory waste the kernel cost report's trace must show
    "planted_coalesced_copy_kernel": ["test_emu_trace.py::test_strided_reads_show_more_sectors_per_request"],
    "planted_strided_copy_kernel": ["test_emu_trace.py::test_strided_reads_show_more_sectors_per_request"],
    "planted_double_read_kernel": ["test_emu_trace.py::test_double_read_shows_twice_the_ideal_read_bytes"],
    # tests/emulated/kernels/planted_faults.cu, continued: the inter-block race
    "planted_block_order_kernel": [
        "test_emu_runtime.py::test_planted_inter_block_race_shows_under_another_block_order",
    ],
}

# Kernels that use tensor-core instructions (mma, wgmma, TMA): the emulation cannot run them. Each maps to the
# GPU test (tests/*.py, marked cuda) that covers it. Empty today.
GPU_ONLY_KERNELS = {}
