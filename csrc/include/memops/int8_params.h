// Parameters of the GPU kernels of the int8 summaries (int8_summary.cuh; layout in quantize.h).
// Plain C++, like gpu_params.h: the torch bindings fill these in, the kernels read them.
#pragma once

#include <cstdint>

#include "memops/common.h"

namespace memops {

struct PrepareMemoryInt8Params {
  const void* keys;         // [B, H, S, D], the keys' float dtype
  int8_t* codes;            // [B, H, N_max, 2, D]
  float* scales;            // [B, H, N_max]
  const int32_t* seq_lens;  // [B] or nullptr (all S); clamped to [0, S]
  int64_t batch, heads, tokens, dim, page_size;
  int64_t first_page, num_pages;  // pages first_page .. num_pages-1 are written
  int64_t key_stride[3];          // b, h, s (elements); d is dense
  int64_t code_stride[4];         // b, h, n, r
  int64_t scale_stride[3];        // b, h, n
};

struct RelevancyInt8Params {
  const void* query;         // [B, Hq, D], float32 / float16 / bfloat16
  const int8_t* codes;       // [B, Hkv, N, 2, D]
  const float* scales;       // [B, Hkv, N]
  const int32_t* num_pages;  // [B] or nullptr; clamped to [0, N]
  float* scores;             // [B, Hkv, N] contiguous; pages past num_pages are not written
  int64_t batch, q_heads, kv_heads, pages, dim;
  int64_t query_stride[2];  // b, h
  int64_t code_stride[4];   // b, h, n, r
  int64_t scale_stride[3];  // b, h, n
  GroupReduce reduce;
};

// Whether the tensor-core scoring kernel of int8 summaries (int8_summary_tc.cuh) takes these
// parameters: a 16-bit query, codes and query readable in 16-byte accesses (`vectorized`), D of
// 64 or 128, GQA groups of 1 to 8 heads. The binding checks the device (sm_80+).
inline bool int8_tc_supported(const RelevancyInt8Params& p, bool vectorized, bool sixteen_bit) {
  const int64_t group = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 0;
  return sixteen_bit && vectorized && (p.dim == 64 || p.dim == 128) && group >= 1 && group <= 8;
}

}  // namespace memops
