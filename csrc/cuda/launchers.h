// Host entry points of the VeRA kernels (defined next to the kernels in the .cu files). Each launches on
// `stream` and returns the launch error; nothing here knows about tensors.
#pragma once

#if defined(VERA_EMULATE_CUDA)
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "cuda/params.h"

namespace vera::cuda {

cudaError_t launch_row_scale(const RowScaleParams& p, cudaStream_t stream);
cudaError_t launch_col_scale(const ColScaleParams& p, cudaStream_t stream);
cudaError_t launch_scale_add(const ScaleAddParams& p, cudaStream_t stream);
cudaError_t launch_col_dot_reduce(const ColDotReduceParams& p, cudaStream_t stream);
// Both lambda gradients of one adapter (partial and finish kernels); chunks from lambda_grads_chunks.
cudaError_t launch_lambda_grads(const LambdaGradsParams& p, cudaStream_t stream);
// W (+)= alpha * delta_W, computed tile by tile in the kernel (no delta tensor). check_only = true: the finiteness
// pass of a safe merge (writes nothing); false: the write pass. cudaErrorInvalidConfiguration past 65535 * 128 rows.
cudaError_t launch_merge(const MergeParams& p, bool check_only, cudaStream_t stream);
// max |value| of each of up to kMaxAbsTensors tensors into p.maxima (p.blocks from max_abs_blocks).
cudaError_t launch_max_abs(const MaxAbsParams& p, cudaStream_t stream);
// Both passes of the fused small-N forward (p.n <= kDecodeMaxRows).
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream);

// The grid of launch_max_abs for tensors of at most `max_numel` values (the caller sizes p.partial).
int max_abs_blocks(int64_t max_numel);
// How many row chunks launch_col_dot_reduce uses for these sizes (the caller sizes the workspace).
int col_dot_reduce_splits(int64_t rows, int64_t cols, int64_t num_adapters);
// The chunk counts of launch_lambda_grads (the caller sizes the workspaces: col_chunks * out_f, row_chunks * r).
void lambda_grads_chunks(int64_t out_f, int64_t r, int* col_chunks, int* row_chunks);

}  // namespace vera::cuda
