// The kernels of emu_selftest_kernels.h.
#include "cuda/kernel_prelude.h"
#include "kernels/emu_selftest_kernels.h"

namespace vera::testing {
namespace {

constexpr unsigned kFull = 0xffffffffu;

__global__ void warp_ops_kernel(const int* in, int* out, int width) {
  const int t = threadIdx.x, v = in[t];
  int* o = out + t * kWarpOpsPerThread;
  o[0] = __shfl_sync(kFull, v, 3, width);
  o[1] = __shfl_up_sync(kFull, v, 2, width);
  o[2] = __shfl_down_sync(kFull, v, 5, width);
  o[3] = __shfl_xor_sync(kFull, v, 9, width);
  int s = v;  // tree sum: lane 0 ends with the warp's sum
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(kFull, s, offset);
  o[4] = s;
  int b = v;  // butterfly: every lane ends with the warp's sum
  for (int offset = 16; offset > 0; offset /= 2) b += __shfl_xor_sync(kFull, b, offset);
  o[5] = b;
  o[6] = static_cast<int>(__ballot_sync(kFull, v % 3 == 0));
  o[7] = __any_sync(kFull, v > 1000) | (__all_sync(kFull, v >= 0) << 1) | (__all_sync(kFull, v > 5) << 2);
  o[8] = static_cast<int>(2.0 * __shfl_xor_sync(kFull, 0.5 * v, 1));  // an 8-byte value
}

__global__ void dynamic_shared_kernel(const float* in, float* out, unsigned* fresh_mismatch, int64_t n) {
  extern __shared__ float buf[];
  extern __shared__ unsigned raw[];  // aliases buf, as every extern __shared__ array of a kernel does
  const int t = threadIdx.x;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + t;
  if (raw[t] != 0xffffffffu) atomicAdd(fresh_mismatch, 1u);
  buf[t] = i < n ? in[i] : 0.f;
  __syncthreads();
  if (i < n) out[i] = __uint_as_float(raw[blockDim.x - 1 - t]);  // another thread's write
}

__global__ void big_dynamic_shared_kernel(float* out) {
  extern __shared__ float big[];
  big[threadIdx.x * 512] = 1.f;  // 32 threads x 512 floats = 64 KiB
  out[threadIdx.x] = big[threadIdx.x * 512];
}

__global__ void atomics_kernel(const int* in, int n, AtomicsResult* r) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int v = __ldg(in + i);
  atomicAdd(&r->fsum, static_cast<float>(v));
  atomicAdd(&r->isum, v);
  atomicMax(&r->imax, v);
  atomicMin(&r->imin, v);
  atomicOr(&r->bits, 1u << (v & 31));
  atomicInc(&r->wrapped, 9u);  // counts modulo 10
  atomicAdd(&r->usum, static_cast<unsigned long long>(v));
  atomicAdd(&r->dsum, 0.25 * v);
  int old = 0, seen;  // a CAS loop, as kernels build custom atomics (first guess 0, no plain read)
  do {
    seen = old;
    old = atomicCAS(&r->cas_count, seen, seen + 1);
  } while (old != seen);
}

__global__ void vector_loads_kernel(const float4* in4, float* out, const int4* src4, int4* copy4, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float4 v = __ldg(in4 + i);
  out[i] = v.x + 2.f * v.y + 3.f * v.z + 4.f * v.w;
  copy4[i] = src4[i];
}

__global__ void indexing_3d_kernel(unsigned* coords, unsigned* ballot) {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned id = bid * (blockDim.x * blockDim.y * blockDim.z) + tid;
  __syncthreads();
  __syncwarp();
  coords[id] =
      threadIdx.x | threadIdx.y << 4 | threadIdx.z << 8 | blockIdx.x << 12 | blockIdx.y << 16 | blockIdx.z << 20;
  ballot[id] = __ballot_sync(kFull, 1);
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 0); }

__global__ void missing_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 8);  // 24 lanes: 16..23 would read 24..31
}

__global__ void warp_divergence_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1);
  } else {
    __syncwarp();
    out[threadIdx.x] = 0;
  }
}

__global__ void bad_block_kernel(int* out) {
  if (threadIdx.x + threadIdx.y + threadIdx.z == 0) out[0] = 1;
}

}  // namespace

cudaError_t launch_warp_ops(const int* in, int* out, int width) {
  return launch_kernel<warp_ops_kernel>(dim3(1), dim3(64), 0, nullptr, in, out, width);
}

cudaError_t launch_dynamic_shared(const float* in, float* out, unsigned* fresh_mismatch, int64_t n, int threads,
                                  size_t shared_bytes) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  return launch_kernel<dynamic_shared_kernel>(dim3(blocks), dim3(threads), shared_bytes, nullptr, in, out,
                                              fresh_mismatch, n);
}

cudaError_t launch_big_dynamic_shared(float* out, bool opt_in) {
  const int bytes = 64 * 1024;
  if (opt_in) {
    const cudaError_t err =
        cudaFuncSetAttribute(big_dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel<big_dynamic_shared_kernel>(dim3(1), dim3(32), bytes, nullptr, out);
}

cudaError_t launch_atomics(const int* in, int n, AtomicsResult* result) {
  return launch_kernel<atomics_kernel>(dim3((n + 127) / 128), dim3(128), 0, nullptr, in, n, result);
}

cudaError_t launch_vector_loads(const float4* in4, float* out, const int4* src4, int4* copy4, int n) {
  return launch_kernel<vector_loads_kernel>(dim3((n + 63) / 64), dim3(64), 0, nullptr, in4, out, src4, copy4, n);
}

cudaError_t launch_indexing_3d(unsigned* coords, unsigned* ballot) {
  return launch_kernel<indexing_3d_kernel>(dim3(3, 2, 2), dim3(4, 3, 2), 0, nullptr, coords, ballot);
}

cudaError_t launch_partial_mask(int* out) {
  return launch_kernel<partial_mask_kernel>(dim3(1), dim3(32), 0, nullptr, out);
}

cudaError_t launch_missing_lane(int* out) {
  return launch_kernel<missing_lane_kernel>(dim3(1), dim3(24), 0, nullptr, out);
}

cudaError_t launch_warp_divergence(int* out) {
  return launch_kernel<warp_divergence_kernel>(dim3(1), dim3(32), 0, nullptr, out);
}

cudaError_t launch_bad_block(int* out, unsigned x, unsigned y, unsigned z) {
  return launch_kernel<bad_block_kernel>(dim3(1), dim3(x, y, z), 0, nullptr, out);
}

}  // namespace vera::testing
