// The int8 summaries on the GPU (layout and rounding: quantize.h): Prepare Memory into codes and
// power-of-two page scales, and the Quest bound scored on the codes (the selection is
// topk_relevancy.cuh's, on the float32 scores this writes).
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include "memops/common.h"
#include "memops/gpu_params.h"
#include "memops/int8_params.h"
#include "memops/quantize.h"
#include "memops/relevancy.h"

namespace memops {

namespace int8_detail {

constexpr int kThreads = 256;
// Prepare: one warp per page, lane l holds elements l, l + kWarpSize, ... of the page's min/max.
constexpr int kPrepareMaxPerLane = static_cast<int>(kGpuMaxDim) / gpu::kWarpSize;
// Scoring: a group of kLanes lanes per page, each holding CHUNKS runs of VEC codes per row.
constexpr int kLanes = 8;

__device__ __forceinline__ float warp_max_nonneg(float v) {
  for (int off = gpu::kWarpSize / 2; off > 0; off /= 2) {
    const float o = gpu::shfl_xor(v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ int warp_or(int v) {
  for (int off = gpu::kWarpSize / 2; off > 0; off /= 2) v |= gpu::shfl_xor(v, off);
  return v;
}

// VEC int8 codes -> floats. Four codes a 32-bit word: flipping the sign bit gives code + 128 as
// an unsigned byte, and 2^23 + (code + 128) is a float whose low mantissa bits are that byte,
// so one integer OR and one exact float subtraction convert each code (no I2F conversions).
template <int VEC>
__device__ __forceinline__ void load_codes(const int8_t* src, float* out) {
  if constexpr (VEC % 4 == 0) {
    const gpu::Vec<uint32_t, VEC / 4> w = *reinterpret_cast<const gpu::Vec<uint32_t, VEC / 4>*>(src);
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
      const uint32_t u = w.v[i] ^ 0x80808080u;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        out[4 * i + k] = bits_to_float(0x4B000000u | ((u >> (8 * k)) & 0xffu)) - 8388736.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(src[j]);
  }
}

template <int VEC, int CHUNKS>
__device__ __forceinline__ void load_page_codes(const int8_t* row, int sub, int64_t dim,
                                                bool active, float* out) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t d0 = (int64_t(c) * kLanes + sub) * VEC;
    if (active && d0 < dim) {
      load_codes<VEC>(row + d0, out + c * VEC);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[c * VEC + j] = 0.f;
    }
  }
}

// This lane's part of sum_d max(q_d a_d, q_d b_d) for one query head (q in shared memory).
template <int VEC, int CHUNKS>
__device__ __forceinline__ float lane_bound_codes(const float* q, const float* lo,
                                                  const float* hi, int sub, int64_t dim) {
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t d0 = (int64_t(c) * kLanes + sub) * VEC;
    if (d0 < dim) {
      float qv[VEC];
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int i = 0; i < VEC / 4; ++i) {
          const gpu::Vec<float, 4> v = reinterpret_cast<const gpu::Vec<float, 4>*>(q + d0)[i];
#pragma unroll
          for (int j = 0; j < 4; ++j) qv[4 * i + j] = v.v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) qv[j] = q[d0 + j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        acc += fmax32(qv[j] * lo[c * VEC + j], qv[j] * hi[c * VEC + j]);
    }
  }
  return acc;
}

template <int VEC, int CHUNKS>
__device__ __forceinline__ float score_codes(const RelevancyInt8Params& p, const float* queries,
                                             int64_t group, const float* lo, const float* hi,
                                             int sub) {
  float score = 0.f;
  for (int64_t g = 0; g < group; ++g) {
    const float head =
        gpu::group_sum(lane_bound_codes<VEC, CHUNKS>(queries + g * p.dim, lo, hi, sub, p.dim),
                       kLanes);
    score = group_combine(score, head, g == 0, p.reduce);
  }
  return score;
}

}  // namespace int8_detail

// Grid-stride over (b, h, page), one warp per page: min/max over the page's valid tokens (as
// prepare_memory_kernel), the page's largest magnitude and NaN flag by warp reductions, then
// the codes and scale of quantize.h.
template <typename T>
__global__ void __launch_bounds__(int8_detail::kThreads)
    prepare_memory_int8_kernel(PrepareMemoryInt8Params p) {
  using namespace int8_detail;
  const int lane = threadIdx.x % gpu::kWarpSize;
  const int64_t warps = blockDim.x / gpu::kWarpSize;
  const int64_t pages = p.num_pages - p.first_page;
  const int64_t total = p.batch * p.heads * pages;
  // The loop bound is uniform across the warp so that every lane takes part in the shuffles.
  for (int64_t i = int64_t(blockIdx.x) * warps + threadIdx.x / gpu::kWarpSize; i < total;
       i += int64_t(gridDim.x) * warps) {
    const int64_t page = p.first_page + i % pages;
    const int64_t h = (i / pages) % p.heads;
    const int64_t b = i / (pages * p.heads);
    int64_t length = p.seq_lens == nullptr ? p.tokens : p.seq_lens[b];
    length = min64(max64(length, 0), p.tokens);
    const int64_t n = page_valid_tokens(page, p.page_size, length);
    const T* src = static_cast<const T*>(p.keys) + b * p.key_stride[0] + h * p.key_stride[1] +
                   page * p.page_size * p.key_stride[2];
    float lo[kPrepareMaxPerLane], hi[kPrepareMaxPerLane];
#pragma unroll
    for (int j = 0; j < kPrepareMaxPerLane; ++j) {
      const int64_t d = lane + int64_t(j) * gpu::kWarpSize;
      lo[j] = hi[j] = (n > 0 && d < p.dim) ? static_cast<float>(src[d]) : 0.f;
    }
    for (int64_t t = 1; t < n; ++t) {
#pragma unroll
      for (int j = 0; j < kPrepareMaxPerLane; ++j) {
        const int64_t d = lane + int64_t(j) * gpu::kWarpSize;
        if (d < p.dim) {
          const float v = static_cast<float>(src[t * p.key_stride[2] + d]);
          lo[j] = fmin32(v, lo[j]);  // NaN-propagating, as summarise_page
          hi[j] = fmax32(v, hi[j]);
        }
      }
    }
    float max_abs = 0.f;
    int has_nan = 0;
#pragma unroll
    for (int j = 0; j < kPrepareMaxPerLane; ++j) {
      has_nan |= (lo[j] != lo[j]) | (hi[j] != hi[j]);
      const float m = fmax32(abs32(lo[j]), abs32(hi[j]));
      max_abs = m > max_abs ? m : max_abs;
    }
    max_abs = warp_max_nonneg(max_abs);
    has_nan = warp_or(has_nan);
    int exponent;
    const float scale = int8_page_scale(max_abs, has_nan != 0, exponent);
    int8_t* dst = p.codes + b * p.code_stride[0] + h * p.code_stride[1] + page * p.code_stride[2];
#pragma unroll
    for (int j = 0; j < kPrepareMaxPerLane; ++j) {
      const int64_t d = lane + int64_t(j) * gpu::kWarpSize;
      if (d < p.dim) {
        int8_t a, c;
        int8_codes(lo[j], hi[j], scale, exponent, a, c);
        dst[d] = a;
        dst[p.code_stride[3] + d] = c;
      }
    }
    if (lane == 0)
      p.scales[b * p.scale_stride[0] + h * p.scale_stride[1] + page * p.scale_stride[2]] = scale;
  }
}

// Grid: x over page blocks (grid-stride), y over (b, kv) rows, as relevancy_scores_kernel. A
// group of 8 lanes scores one page: each lane converts its codes to floats once and loops over
// the group's query heads (float32 in shared memory); the page's group score is multiplied by
// its scale. Each lane group loads two pages before computing either.
template <typename Q, int VEC, int CHUNKS>
__global__ void __launch_bounds__(int8_detail::kThreads)
    relevancy_scores_int8_kernel(RelevancyInt8Params p) {
  using namespace int8_detail;
  extern __shared__ float shared_query[];  // [G, D]
  const int64_t row = blockIdx.y, b = row / p.kv_heads, kv = row % p.kv_heads;
  const int64_t group = p.q_heads / p.kv_heads, dim = p.dim;
  const Q* query = static_cast<const Q*>(p.query);
  for (int64_t i = threadIdx.x; i < group * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    shared_query[i] = static_cast<float>(
        query[b * p.query_stride[0] + (kv * group + g) * p.query_stride[1] + d]);
  }
  __syncthreads();

  const int64_t limit =
      p.num_pages == nullptr ? p.pages : min64(max64(p.num_pages[b], 0), p.pages);
  constexpr int kPagesPerWarp = gpu::kWarpSize / kLanes;
  const int warp = threadIdx.x / gpu::kWarpSize, lane = threadIdx.x % gpu::kWarpSize;
  const int sub = lane % kLanes;
  const int64_t warps = blockDim.x / gpu::kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * warps * 2 * kPagesPerWarp;
  const int8_t* codes = p.codes + b * p.code_stride[0] + kv * p.code_stride[1];
  const float* scales = p.scales + b * p.scale_stride[0] + kv * p.scale_stride[1];
  for (int64_t base = (int64_t(blockIdx.x) * warps + warp) * 2 * kPagesPerWarp; base < limit;
       base += stride) {
    const int64_t page_a = base + lane / kLanes, page_b = page_a + kPagesPerWarp;
    const bool active_a = page_a < limit, active_b = page_b < limit;
    const int8_t* row_a = codes + (active_a ? page_a : 0) * p.code_stride[2];
    const int8_t* row_b = codes + (active_b ? page_b : 0) * p.code_stride[2];
    float lo_a[CHUNKS * VEC], hi_a[CHUNKS * VEC], lo_b[CHUNKS * VEC], hi_b[CHUNKS * VEC];
    load_page_codes<VEC, CHUNKS>(row_a, sub, dim, active_a, lo_a);
    load_page_codes<VEC, CHUNKS>(row_a + p.code_stride[3], sub, dim, active_a, hi_a);
    load_page_codes<VEC, CHUNKS>(row_b, sub, dim, active_b, lo_b);
    load_page_codes<VEC, CHUNKS>(row_b + p.code_stride[3], sub, dim, active_b, hi_b);
    const float score_a = score_codes<VEC, CHUNKS>(p, shared_query, group, lo_a, hi_a, sub);
    const float score_b = score_codes<VEC, CHUNKS>(p, shared_query, group, lo_b, hi_b, sub);
    if (sub == 0) {
      if (active_a) p.scores[row * p.pages + page_a] = scales[page_a * p.scale_stride[2]] * score_a;
      if (active_b) p.scores[row * p.pages + page_b] = scales[page_b * p.scale_stride[2]] * score_b;
    }
  }
}

template <typename T>
gpu::Error launch_prepare_memory_int8(const PrepareMemoryInt8Params& p, int max_blocks,
                                      gpu::Stream stream) {
  using namespace int8_detail;
  const int64_t total = p.batch * p.heads * (p.num_pages - p.first_page);
  if (total <= 0) return gpu::kSuccess;
  const int64_t warps = kThreads / gpu::kWarpSize;
  const int64_t blocks = max64(1, min64(ceil_div(total, warps), max_blocks));
  prepare_memory_int8_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return gpu::last_error();
}

template <typename Q, int VEC, int CHUNKS>
gpu::Error launch_relevancy_scores_int8(const RelevancyInt8Params& p, int target_blocks,
                                        gpu::Stream stream) {
  using namespace int8_detail;
  const int64_t rows = p.batch * p.kv_heads;
  if (rows == 0 || p.pages == 0) return gpu::kSuccess;
  const int64_t pages_per_block = 2 * (kThreads / gpu::kWarpSize) * (gpu::kWarpSize / kLanes);
  const int64_t blocks_x =
      max64(1, min64(ceil_div(p.pages, pages_per_block), ceil_div(target_blocks, rows)));
  const int64_t group = p.q_heads / p.kv_heads;
  const int shared = static_cast<int>(group * p.dim * sizeof(float));
  if (shared > 48 * 1024) {
    const gpu::Error e = gpu::set_max_dynamic_shared(
        reinterpret_cast<const void*>(&relevancy_scores_int8_kernel<Q, VEC, CHUNKS>), shared);
    if (e != gpu::kSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  relevancy_scores_int8_kernel<Q, VEC, CHUNKS><<<grid, kThreads, shared, stream>>>(p);
  return gpu::last_error();
}

// The widest instantiation these parameters allow: 16 codes a lane (D % 16 == 0 and 16-byte
// aligned rows: `vectorized`) in one or two runs, else one code a lane (any D <= kGpuMaxDim).
template <typename Q>
gpu::Error launch_relevancy_scores_int8(const RelevancyInt8Params& p, bool vectorized,
                                        int target_blocks, gpu::Stream stream) {
  using namespace int8_detail;
  if (vectorized && p.dim <= kLanes * 16)
    return launch_relevancy_scores_int8<Q, 16, 1>(p, target_blocks, stream);
  if (vectorized && p.dim <= kLanes * 32)
    return launch_relevancy_scores_int8<Q, 16, 2>(p, target_blocks, stream);
  return launch_relevancy_scores_int8<Q, 1, static_cast<int>(kGpuMaxDim) / kLanes>(
      p, target_blocks, stream);
}

}  // namespace memops
