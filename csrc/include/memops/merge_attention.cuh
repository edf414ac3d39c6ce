// Exact merge of two partial attentions on the GPU: one warp per row, weights computed once.
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include "memops/attention.h"
#include "memops/common.h"
#include "memops/gpu_params.h"

namespace memops {

template <typename T>
__global__ void merge_attention_kernel(MergeAttentionParams p) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / gpu::kWarpSize);
  const int lane = threadIdx.x % gpu::kWarpSize;
  for (int64_t row = int64_t(blockIdx.x) * (blockDim.x / gpu::kWarpSize) +
                     threadIdx.x / gpu::kWarpSize;
       row < p.rows; row += warps) {
    float w_a, w_b, lse;
    merge_weights(p.lse_a[row], p.lse_b[row], w_a, w_b, lse);
    const T* a = static_cast<const T*>(p.out_a) + row * p.dim;
    const T* b = static_cast<const T*>(p.out_b) + row * p.dim;
    T* out = static_cast<T*>(p.out) + row * p.dim;
    for (int64_t d = lane; d < p.dim; d += gpu::kWarpSize)
      out[d] = static_cast<T>(w_a * static_cast<float>(a[d]) + w_b * static_cast<float>(b[d]));
    if (lane == 0) p.lse[row] = lse;
  }
}

template <typename T>
gpu::Error launch_merge_attention(const MergeAttentionParams& p, int max_blocks,
                                  gpu::Stream stream) {
  if (p.rows == 0) return gpu::kSuccess;
  const int threads = 256, rows_per_block = threads / gpu::kWarpSize;
  const int64_t blocks = min64(ceil_div(p.rows, rows_per_block), max_blocks);
  merge_attention_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  return gpu::last_error();
}

}  // namespace memops
