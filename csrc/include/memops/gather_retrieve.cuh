// Retrieval on the GPU: copy the selected pages back to back (bit-exact, any dtype).
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include "memops/common.h"
#include "memops/gpu_params.h"

namespace memops {

__device__ __forceinline__ int64_t gather_valid(const GatherRetrieveParams& p, int64_t b,
                                                int32_t page) {
  int64_t length = p.seq_lens == nullptr ? p.tokens : p.seq_lens[b];
  length = min64(max64(length, 0), p.tokens);
  const bool in_range = page >= 0 && page < ceil_div(p.tokens, p.page_size);
  return in_range ? page_valid_tokens(page, p.page_size, length) : 0;
}

// One thread per copy unit U (16 bytes when alignment allows) of every output row; rows past a
// page's valid tokens, and padding slots, are zero.
template <typename U>
__global__ void gather_retrieve_kernel(GatherRetrieveParams p) {
  const int64_t units = p.row_bytes / sizeof(U);
  const int64_t total = p.batch * p.heads * p.k * p.page_size * units;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t unit = i % units;
    const int64_t out_row = i / units;  // (b, h, slot, token in page)
    const int64_t t = out_row % p.page_size;
    const int64_t slot_id = out_row / p.page_size;  // (b, h, slot)
    const int64_t bh = slot_id / p.k, b = bh / p.heads, h = bh % p.heads;
    const int32_t page = p.indices[slot_id];
    U value{};
    if (t < gather_valid(p, b, page)) {
      const char* src = p.memory + b * p.memory_stride[0] + h * p.memory_stride[1] +
                        (int64_t(page) * p.page_size + t) * p.memory_stride[2];
      value = reinterpret_cast<const U*>(src)[unit];
    }
    reinterpret_cast<U*>(p.out + out_row * p.row_bytes)[unit] = value;
  }
}

__global__ void gather_lengths_kernel(GatherRetrieveParams p) {
  const int64_t rows = p.batch * p.heads;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = r / p.heads, pages = ceil_div(p.tokens, p.page_size);
    int64_t count = 0;
    int32_t errors = 0;
    for (int64_t j = 0; j < p.k; ++j) {
      const int32_t page = p.indices[r * p.k + j];
      count += gather_valid(p, b, page);
      if (page < -1 || page >= pages) errors |= kValueErrorIndex;
    }
    if (p.seq_lens != nullptr && (p.seq_lens[b] < 0 || p.seq_lens[b] > p.tokens))
      errors |= kValueErrorSeqLen;
    gpu::report_value_error(p.value_errors, errors);
    p.lengths[r] = static_cast<int32_t>(count);
  }
}

template <typename U>
gpu::Error launch_gather_retrieve(const GatherRetrieveParams& p, int max_blocks,
                                  gpu::Stream stream) {
  const int threads = 256;
  const int64_t rows = p.batch * p.heads;
  if (rows == 0) return gpu::kSuccess;
  const int64_t total = rows * p.k * p.page_size * (p.row_bytes / int64_t(sizeof(U)));
  if (total > 0) {
    gather_retrieve_kernel<U>
        <<<static_cast<unsigned>(min64(ceil_div(total, threads), max_blocks)), threads, 0,
           stream>>>(p);
    const gpu::Error e = gpu::last_error();
    if (e != gpu::kSuccess) return e;
  }
  gather_lengths_kernel<<<static_cast<unsigned>(min64(ceil_div(rows, threads), max_blocks)),
                          threads, 0, stream>>>(p);
  return gpu::last_error();
}

}  // namespace memops
