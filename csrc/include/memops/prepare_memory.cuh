// Prepare Memory on the GPU: per-page min/max or mean of the keys, one pass over the pages.
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include "memops/common.h"
#include "memops/gpu_params.h"

namespace memops {

// One thread per (b, h, page, VEC-wide slice of d): coalesced along d, tokens of the page read
// in order, so every key element is read exactly once.
template <typename T, int VEC>
__global__ void prepare_memory_kernel(PrepareMemoryParams p) {
  const int64_t slices = p.dim / VEC;
  const int64_t pages = p.num_pages - p.first_page;
  const int64_t total = p.batch * p.heads * pages * slices;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t slice = i % slices;
    const int64_t page = p.first_page + (i / slices) % pages;
    const int64_t h = (i / (slices * pages)) % p.heads;
    const int64_t b = i / (slices * pages * p.heads);
    int64_t length = p.seq_lens == nullptr ? p.tokens : p.seq_lens[b];
    if (h == 0 && page == p.first_page && slice == 0 && (length < 0 || length > p.tokens))
      gpu::report_value_error(p.value_errors, kValueErrorSeqLen);
    length = min64(max64(length, 0), p.tokens);
    const int64_t n = page_valid_tokens(page, p.page_size, length);
    const T* src = static_cast<const T*>(p.keys) + b * p.key_stride[0] + h * p.key_stride[1] +
                   page * p.page_size * p.key_stride[2] + slice * VEC;
    T* dst = static_cast<T*>(p.summary) + b * p.summary_stride[0] + h * p.summary_stride[1] +
             page * p.summary_stride[2] + slice * VEC;
    float lo[VEC], hi[VEC], v[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) lo[j] = hi[j] = 0.f;
    if (p.mode == SummaryMode::kMinMax) {
      if (n > 0) gpu::load_floats<T, VEC>(src, lo);
#pragma unroll
      for (int j = 0; j < VEC; ++j) hi[j] = lo[j];
      for (int64_t t = 1; t < n; ++t) {
        gpu::load_floats<T, VEC>(src + t * p.key_stride[2], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          lo[j] = fmin32(v[j], lo[j]);  // NaN-propagating, as summarise_page
          hi[j] = fmax32(v[j], hi[j]);
        }
      }
      gpu::store_floats<T, VEC>(dst, lo);
      gpu::store_floats<T, VEC>(dst + p.summary_stride[3], hi);
    } else {
      for (int64_t t = 0; t < n; ++t) {
        gpu::load_floats<T, VEC>(src + t * p.key_stride[2], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) lo[j] += v[j];
      }
      // Divide (not multiply by 1/n) to round as the host backends do.
#pragma unroll
      for (int j = 0; j < VEC; ++j) lo[j] = n > 0 ? lo[j] / static_cast<float>(n) : 0.f;
      gpu::store_floats<T, VEC>(dst, lo);
    }
  }
}

template <typename T, int VEC>
gpu::Error launch_prepare_memory(const PrepareMemoryParams& p, int max_blocks, gpu::Stream stream) {
  const int64_t total = p.batch * p.heads * (p.num_pages - p.first_page) * (p.dim / VEC);
  if (total <= 0) return gpu::kSuccess;
  const int threads = 256;
  const int64_t blocks = min64(ceil_div(total, threads), max_blocks);
  prepare_memory_kernel<T, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  return gpu::last_error();
}

}  // namespace memops
