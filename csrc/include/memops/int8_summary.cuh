// The int8 summaries on the GPU (layout and rounding: quantize.h): Prepare Memory into codes and
// power-of-two page scales, and the Quest bound scored on the codes, portable (CUDA and HIP; the
// tensor-core kernel for 16-bit queries is int8_summary_tc.cuh). The selection is
// topk_relevancy.cuh's, on the float32 scores written here: in the scoring kernel's last block of
// each row (rows of up to kFusedSelectMaxPages pages) or as a kernel of its own.
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include "memops/common.h"
#include "memops/gpu_params.h"
#include "memops/int8_params.h"
#include "memops/quantize.h"
#include "memops/relevancy.h"
#include "memops/topk_relevancy.cuh"

namespace memops {

namespace int8_detail {

constexpr int kThreads = 256;
// Prepare: one warp per page, lane l holds elements l, l + kWarpSize, ... of the page's min/max.
constexpr int kPrepareMaxPerLane = static_cast<int>(kGpuMaxDim) / gpu::kWarpSize;
// Scoring: a group of kLanes lanes per page, each holding CHUNKS runs of VEC codes per row.
constexpr int kLanes = 8;
constexpr int kPagesPerGroup = 2;  // pages a lane group scores at once

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

// One page's codes in this lane, ordered: hi = max(a, b), lo = min(a, b) (integers, no NaN), so
// that max(q a, q b) = q * (q >= 0 ? hi : lo): one select and one fused multiply-add an element
// and head (a 16-bit query times a code is exact in float32, so only the sum rounds).
template <int VEC, int CHUNKS>
struct PageCodes {
  float lo[CHUNKS * VEC], hi[CHUNKS * VEC];
};

template <int VEC, int CHUNKS>
__device__ __forceinline__ void load_page(const int8_t* page, int64_t rep_stride, int sub,
                                          int64_t dim, bool active, PageCodes<VEC, CHUNKS>& out) {
  float a[CHUNKS * VEC];
  load_page_codes<VEC, CHUNKS>(page, sub, dim, active, a);
  load_page_codes<VEC, CHUNKS>(page + rep_stride, sub, dim, active, out.hi);
#pragma unroll
  for (int j = 0; j < CHUNKS * VEC; ++j) {
    out.lo[j] = a[j] < out.hi[j] ? a[j] : out.hi[j];
    out.hi[j] = a[j] < out.hi[j] ? out.hi[j] : a[j];
  }
}

// Where element d of a query head sits in shared memory. With 16 codes a lane, lane `sub` reads
// elements 16 s .. 16 s + 15 (s = c * kLanes + sub) as four float4; the float4 index is XORed with
// (s / 2) % 4 so that the 8 lanes of a group hit 8 different bank quads (no conflict).
template <int VEC>
__device__ __forceinline__ int64_t query_slot(int64_t d) {
  if constexpr (VEC == 16) {
    const int64_t s = d / 16, i = (d / 4) % 4;
    return 16 * s + 4 * (i ^ ((s / 2) % 4)) + d % 4;
  } else {
    return d;
  }
}

// This lane's part of sum_d max(q_d a_d, q_d b_d) for one query head (q in shared memory, laid
// out by query_slot) on kPages pages at once, so each query element is read once for all.
template <int VEC, int CHUNKS, int kPages>
__device__ __forceinline__ void lane_bounds(const float* q, const PageCodes<VEC, CHUNKS>* pages,
                                            int sub, int64_t dim, float* acc) {
#pragma unroll
  for (int i = 0; i < kPages; ++i) acc[i] = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t s = int64_t(c) * kLanes + sub, d0 = s * VEC;
    if (d0 < dim) {
      float qv[VEC];
      if constexpr (VEC == 16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const gpu::Vec<float, 4> v =
              *reinterpret_cast<const gpu::Vec<float, 4>*>(q + d0 + 4 * (i ^ ((s / 2) % 4)));
#pragma unroll
          for (int j = 0; j < 4; ++j) qv[4 * i + j] = v.v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) qv[j] = q[d0 + j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool up = qv[j] >= 0.f;
#pragma unroll
        for (int i = 0; i < kPages; ++i)
          acc[i] = fmaf(qv[j], up ? pages[i].hi[c * VEC + j] : pages[i].lo[c * VEC + j], acc[i]);
      }
    }
  }
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
    // Unrolled so that several tokens' loads are in flight at once (the min/max order is kept).
#pragma unroll 4
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
// group of 8 lanes scores kPagesPerGroup pages at once: each lane converts its codes to floats
// once, orders each (a, b) pair, and loops over the group's query heads (float32 in shared
// memory, each element read once for all the pages); the page's group score is multiplied by its
// scale. A head score that comes out non-finite (an inf or NaN query element, or an overflow) is
// computed again with the scalar formula of relevancy.h, so those cases match the reference.
// `done` (zeroed per row) fuses the selection: the last block of a row selects its top-k.
template <typename Q, int VEC, int CHUNKS>
__global__ void __launch_bounds__(int8_detail::kThreads, VEC * CHUNKS <= 16 ? 2 : 1)
    relevancy_scores_int8_kernel(RelevancyInt8Params p, SelectParams sp, int* done) {
  using namespace int8_detail;
  extern __shared__ float shared_query[];  // [G, D], element d at query_slot<VEC>(d)
  const int64_t row = blockIdx.y, b = row / p.kv_heads, kv = row % p.kv_heads;
  const int64_t group = p.q_heads / p.kv_heads, dim = p.dim;
  const Q* query = static_cast<const Q*>(p.query) + b * p.query_stride[0] +
                   kv * group * p.query_stride[1];
  for (int64_t i = threadIdx.x; i < group * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    shared_query[g * dim + query_slot<VEC>(d)] =
        static_cast<float>(query[g * p.query_stride[1] + d]);
  }
  __syncthreads();

  const int64_t limit =
      p.num_pages == nullptr ? p.pages : min64(max64(p.num_pages[b], 0), p.pages);
  constexpr int kGroups = gpu::kWarpSize / kLanes;  // lane groups a warp
  const int warp = threadIdx.x / gpu::kWarpSize, lane = threadIdx.x % gpu::kWarpSize;
  const int sub = lane % kLanes;
  const int64_t warps = blockDim.x / gpu::kWarpSize;
  const int64_t per_warp = int64_t(kPagesPerGroup) * kGroups;
  const int64_t stride = int64_t(gridDim.x) * warps * per_warp;
  const int8_t* codes = p.codes + b * p.code_stride[0] + kv * p.code_stride[1];
  const float* scales = p.scales + b * p.scale_stride[0] + kv * p.scale_stride[1];
  // The loop bound is uniform across the warp so that every lane takes part in the shuffles.
  for (int64_t base = (int64_t(blockIdx.x) * warps + warp) * per_warp; base < limit;
       base += stride) {
    int64_t page[kPagesPerGroup];
    bool active[kPagesPerGroup];
    const int8_t* rows[kPagesPerGroup];
    PageCodes<VEC, CHUNKS> codes_of[kPagesPerGroup];
    float scale[kPagesPerGroup];
#pragma unroll
    for (int i = 0; i < kPagesPerGroup; ++i) {
      page[i] = base + lane / kLanes + int64_t(i) * kGroups;
      active[i] = page[i] < limit;
      rows[i] = codes + (active[i] ? page[i] : 0) * p.code_stride[2];
      load_page<VEC, CHUNKS>(rows[i], p.code_stride[3], sub, dim, active[i], codes_of[i]);
      scale[i] = (active[i] && sub == 0) ? scales[page[i] * p.scale_stride[2]] : 0.f;
    }
    float score[kPagesPerGroup] = {};
#pragma unroll 1
    for (int64_t g = 0; g < group; ++g) {
      float head[kPagesPerGroup];
      lane_bounds<VEC, CHUNKS, kPagesPerGroup>(shared_query + g * dim, codes_of, sub, dim, head);
#pragma unroll
      for (int i = 0; i < kPagesPerGroup; ++i) {
        head[i] = gpu::group_sum(head[i], kLanes);
        if (active[i] && !isfinite(head[i]))  // the whole lane group (same sum) or none
          head[i] = score_bound(query + g * p.query_stride[1], rows[i], rows[i] + p.code_stride[3],
                                dim);
        score[i] = group_combine(score[i], head[i], g == 0, p.reduce);
      }
    }
    if (sub == 0) {
#pragma unroll
      for (int i = 0; i < kPagesPerGroup; ++i)
        if (active[i]) p.scores[row * p.pages + page[i]] = scale[i] * score[i];
    }
  }
  if (done != nullptr) select_if_last_block<kThreads>(sp, row, done);
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
gpu::Error launch_relevancy_scores_int8(const RelevancyInt8Params& p, const SelectParams& sp,
                                        int* done, int target_blocks, gpu::Stream stream) {
  using namespace int8_detail;
  const int64_t rows = p.batch * p.kv_heads;
  // Without pages there is nothing to score, but a fused selection still pads the rows.
  if (rows == 0 || (p.pages == 0 && done == nullptr)) return gpu::kSuccess;
  const int64_t pages_per_block =
      int64_t(kPagesPerGroup) * (kThreads / gpu::kWarpSize) * (gpu::kWarpSize / kLanes);
  const int64_t blocks_x =
      max64(1, min64(ceil_div(p.pages, pages_per_block), ceil_div(target_blocks, rows)));
  const int64_t group = p.q_heads / p.kv_heads;
  const int shared = static_cast<int>(group * p.dim * sizeof(float));
  // The default limit (48 KB) covers static + dynamic shared memory; the fused selection's
  // static part is about 2 KB, so larger queries opt in early.
  if (shared > 40 * 1024) {
    const gpu::Error e = gpu::set_max_dynamic_shared(
        reinterpret_cast<const void*>(&relevancy_scores_int8_kernel<Q, VEC, CHUNKS>), shared);
    if (e != gpu::kSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows));
  relevancy_scores_int8_kernel<Q, VEC, CHUNKS><<<grid, kThreads, shared, stream>>>(p, sp, done);
  return gpu::last_error();
}

// The widest instantiation these parameters allow: 16 codes a lane (D % 16 == 0 and 16-byte
// aligned rows: `vectorized`) in one or two runs, else one code a lane (any D <= kGpuMaxDim).
// `done`: rows zeroed ints to select in the scoring kernel (rows of up to kFusedSelectMaxPages
// pages), or nullptr to leave the selection to launch_select_topk.
template <typename Q>
gpu::Error launch_relevancy_scores_int8(const RelevancyInt8Params& p, const SelectParams& sp,
                                        int* done, bool vectorized, int target_blocks,
                                        gpu::Stream stream) {
  using namespace int8_detail;
  if (vectorized && p.dim <= kLanes * 16)
    return launch_relevancy_scores_int8<Q, 16, 1>(p, sp, done, target_blocks, stream);
  if (vectorized && p.dim <= kLanes * 32)
    return launch_relevancy_scores_int8<Q, 16, 2>(p, sp, done, target_blocks, stream);
  return launch_relevancy_scores_int8<Q, 1, static_cast<int>(kGpuMaxDim) / kLanes>(
      p, sp, done, target_blocks, stream);
}

}  // namespace memops
