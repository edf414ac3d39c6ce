// Apply to Inference on the GPU: split-K decode attention (flash-decoding) over the tokens of the
// selected pages, gathered inside the kernel from strided caches. Each block takes one kv head's
// selection and a contiguous range of its pages, and serves every query head of the GQA group
// that shares the selection, so each kv page is read once for the whole group. The partial
// results of the splits are merged exactly by a second kernel.
#pragma once

// First: on HIP it defines the __host__/__device__/__forceinline__ that common.h uses.
#include "memops/gpu_compat.h"

#include <cmath>

#include "memops/attention.h"
#include "memops/common.h"
#include "memops/gpu_params.h"

namespace memops {

namespace apply_detail {

constexpr int kThreads = 256;
constexpr int kTile = static_cast<int>(kApplyTile);
constexpr int kThreadsPerToken = kThreads / kTile;
constexpr int kMaxDim = static_cast<int>(kGpuMaxDim);
constexpr int kMaxSplits = static_cast<int>(kApplyMaxSplits);

// Elements per value load: at most 4, so that the accumulators of 8 heads fit in registers
// next to two resident blocks per multiprocessor.
template <int VEC>
constexpr int value_vec() {
  return VEC > 4 ? 4 : VEC;
}

}  // namespace apply_detail

// Value errors of one split block (the out-of-range rule has already been applied): each page
// slot of the split once (the caller passes head chunk 0 only), seq_lens[b] once per batch row.
// Shared by the CUDA-core and the tensor-core split kernels.
__device__ inline void report_split_value_errors(const SparseApplyParams& p, const int32_t* index_list,
                                                 int64_t slot_begin, int64_t slot_end, int64_t total_pages,
                                                 int64_t b, int64_t split, int64_t index_head) {
  int32_t errors = 0;
  if (index_list != nullptr)
    for (int64_t slot = slot_begin + threadIdx.x; slot < slot_end; slot += blockDim.x)
      if (index_list[slot] < -1 || index_list[slot] >= total_pages) errors |= kValueErrorIndex;
  if (threadIdx.x == 0 && split == 0 && index_head == 0 && p.seq_lens != nullptr &&
      (p.seq_lens[b] < 0 || p.seq_lens[b] > p.tokens))
    errors |= kValueErrorSeqLen;
  gpu::report_value_error(p.value_errors, errors);
}

// Grid: x = split, y = (b, index head, head chunk). kMaxHeads bounds the query heads a block
// serves (their accumulators live in registers).
template <typename T, int VEC, int kMaxHeads>
__global__ void __launch_bounds__(apply_detail::kThreads, 2)
    sparse_apply_split_kernel(SparseApplyParams p) {
  using namespace apply_detail;
  __shared__ float shared_query[kMaxHeads * kMaxDim];  // later reused for the block's reduction
  __shared__ float logits[kMaxHeads][kTile];           // then the softmax weights of the tile
  __shared__ int64_t key_offset[kTile];                // -1 marks a token not attended
  __shared__ int64_t value_offset[kTile];
  __shared__ float running_max[kMaxHeads], running_sum[kMaxHeads], rescale[kMaxHeads];

  const int64_t group = p.q_heads / p.kv_heads, dim = p.dim;
  const int64_t chunk = blockIdx.y % p.head_chunks;
  const int64_t index_row = blockIdx.y / p.head_chunks;
  const int64_t b = index_row / p.index_heads, index_head = index_row % p.index_heads;
  const bool per_query_head = p.index_heads != p.kv_heads;
  const int64_t kv = per_query_head ? index_head / group : index_head;
  const int64_t row_first_head = per_query_head ? index_head : kv * group;
  const int64_t row_heads = per_query_head ? 1 : group;
  const int64_t first_head = row_first_head + chunk * kMaxHeads;
  const int heads = static_cast<int>(min64(kMaxHeads, row_heads - chunk * kMaxHeads));
  const int64_t split = blockIdx.x;
  const int64_t slot_begin = split * p.slots_per_split;
  const int64_t slot_end = min64(slot_begin + p.slots_per_split, p.slots);
  int64_t length = p.seq_lens == nullptr ? p.tokens : p.seq_lens[b];
  length = min64(max64(length, 0), p.tokens);
  const int64_t total_pages = ceil_div(p.tokens, p.page_size);
  const int32_t* index_list = p.indices == nullptr ? nullptr : p.indices + index_row * p.slots;
  const T* query = static_cast<const T*>(p.query);
  const T* k_base = static_cast<const T*>(p.k_cache) + b * p.k_stride[0] + kv * p.k_stride[1];
  const T* v_base = static_cast<const T*>(p.v_cache) + b * p.v_stride[0] + kv * p.v_stride[1];

  for (int64_t i = threadIdx.x; i < int64_t(heads) * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    shared_query[g * dim + d] = static_cast<float>(
        query[b * p.query_stride[0] + (first_head + g) * p.query_stride[1] + d]);
  }
  if (threadIdx.x < kMaxHeads) {
    running_max[threadIdx.x] = -INFINITY;
    running_sum[threadIdx.x] = 0.f;
  }
  __syncthreads();

  const int64_t chunks = dim / VEC;
  const int token_in_tile = threadIdx.x / kThreadsPerToken, part = threadIdx.x % kThreadsPerToken;
  // Value phase: thread = (token stripe, kValueVec-wide slice of d).
  constexpr int kValueVec = value_vec<VEC>();
  const int64_t value_chunks = dim / kValueVec;
  const int64_t stripes = max64(1, kThreads / value_chunks);
  const int64_t my_chunk = threadIdx.x % value_chunks, my_stripe = threadIdx.x / value_chunks;
  float acc[kMaxHeads][kValueVec];
#pragma unroll
  for (int g = 0; g < kMaxHeads; ++g)
#pragma unroll
    for (int v = 0; v < kValueVec; ++v) acc[g][v] = 0.f;

  const int64_t split_tokens = (slot_end - slot_begin) * p.page_size;
  for (int64_t tile = 0; tile < split_tokens; tile += kTile) {
    if (threadIdx.x < kTile) {
      const int64_t j = tile + threadIdx.x;
      const int64_t slot = slot_begin + j / p.page_size;
      int64_t key = -1, value = -1;
      if (j < split_tokens) {
        const int64_t page = index_list == nullptr ? slot : index_list[slot];
        const int64_t token = page * p.page_size + j % p.page_size;
        if (page >= 0 && page < total_pages && token < length) {
          key = token * p.k_stride[2];
          value = token * p.v_stride[2];
        }
      }
      key_offset[threadIdx.x] = key;
      value_offset[threadIdx.x] = value;
    }
    __syncthreads();

    // Logits of the tile: kThreadsPerToken lanes per token, each a share of d, all heads.
    {
      const int64_t key = key_offset[token_in_tile];
      float dots[kMaxHeads];
#pragma unroll
      for (int g = 0; g < kMaxHeads; ++g) dots[g] = 0.f;
      if (key >= 0) {
#pragma unroll 4
        for (int64_t c = part; c < chunks; c += kThreadsPerToken) {
          float k_vals[VEC];
          gpu::load_floats<T, VEC>(k_base + key + c * VEC, k_vals);
#pragma unroll
          for (int g = 0; g < kMaxHeads; ++g) {
            if (g < heads) {
              const float* q = shared_query + g * dim + c * VEC;
#pragma unroll
              for (int v = 0; v < VEC; ++v) dots[g] += q[v] * k_vals[v];
            }
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxHeads; ++g) {
        const float total = gpu::group_sum(dots[g], kThreadsPerToken);
        if (part == 0 && g < heads) logits[g][token_in_tile] = key >= 0 ? total * p.scale : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax, one warp per head: logits become weights, the running state is updated.
    {
      const int warp = threadIdx.x / gpu::kWarpSize, lane = threadIdx.x % gpu::kWarpSize;
      for (int g = warp; g < heads; g += kThreads / gpu::kWarpSize) {
        float tile_max = -INFINITY;
        for (int j = lane; j < kTile; j += gpu::kWarpSize) tile_max = fmax32(tile_max, logits[g][j]);
        tile_max = gpu::warp_max(tile_max);
        const float old_max = running_max[g];
        const float new_max = fmax32(old_max, tile_max);
        float sum = 0.f;
        for (int j = lane; j < kTile; j += gpu::kWarpSize) {
          const float weight = new_max == -INFINITY ? 0.f : expf(logits[g][j] - new_max);
          logits[g][j] = weight;
          sum += weight;
        }
        sum = gpu::warp_sum(sum);
        if (lane == 0) {
          const float factor = old_max == -INFINITY ? 0.f : expf(old_max - new_max);
          running_sum[g] = running_sum[g] * factor + sum;
          running_max[g] = new_max;
          rescale[g] = factor;
        }
      }
    }
    __syncthreads();

    if (my_stripe < stripes) {
#pragma unroll
      for (int g = 0; g < kMaxHeads; ++g) {
        const float factor = g < heads ? rescale[g] : 0.f;
#pragma unroll
        for (int v = 0; v < kValueVec; ++v) acc[g][v] *= factor;
      }
#pragma unroll 4
      for (int64_t j = my_stripe; j < kTile; j += stripes) {
        const int64_t value = value_offset[j];
        if (value < 0) continue;
        float v_vals[kValueVec];
        gpu::load_floats<T, kValueVec>(v_base + value + my_chunk * kValueVec, v_vals);
#pragma unroll
        for (int g = 0; g < kMaxHeads; ++g) {
          const float weight = g < heads ? logits[g][j] : 0.f;
#pragma unroll
          for (int v = 0; v < kValueVec; ++v) acc[g][v] += weight * v_vals[v];
        }
      }
    }
    __syncthreads();
  }

  // Sum the stripes' accumulators in a fixed order (deterministic), then write the partials.
  float* reduced = shared_query;
  for (int64_t stripe = 0; stripe < stripes; ++stripe) {
    if (my_stripe == stripe) {
#pragma unroll
      for (int g = 0; g < kMaxHeads; ++g) {
        if (g < heads) {
#pragma unroll
          for (int v = 0; v < kValueVec; ++v) {
            float& slot = reduced[g * dim + my_chunk * kValueVec + v];
            slot = stripe == 0 ? acc[g][v] : slot + acc[g][v];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < int64_t(heads) * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    const int64_t out_row = b * p.q_heads + first_head + g;
    p.partial_acc[(out_row * p.splits + split) * dim + d] = reduced[i];
  }
  if (threadIdx.x < heads) {
    const int64_t out_row = b * p.q_heads + first_head + threadIdx.x;
    p.partial_max[out_row * p.splits + split] = running_max[threadIdx.x];
    p.partial_sum[out_row * p.splits + split] = running_sum[threadIdx.x];
  }
  if (p.value_errors != nullptr && chunk == 0)
    report_split_value_errors(p, index_list, slot_begin, slot_end, total_pages, b, split, index_head);
}

// One block per (b, query head): the exact combination of the splits.
template <typename T>
__global__ void sparse_apply_merge_kernel(SparseApplyParams p) {
  using namespace apply_detail;
  __shared__ float weight[kMaxSplits];
  __shared__ float total_sum, total_lse;
  const int64_t out_row = blockIdx.x;
  const float* maxes = p.partial_max + out_row * p.splits;
  const float* sums = p.partial_sum + out_row * p.splits;
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int64_t s = 0; s < p.splits; ++s) m = fmax32(m, maxes[s]);
    float l = 0.f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float w = maxes[s] == -INFINITY ? 0.f : expf(maxes[s] - m);
      weight[s] = w;
      l += w * sums[s];
    }
    total_sum = l;
    total_lse = l > 0.f ? m + logf(l) : -INFINITY;
  }
  __syncthreads();
  const float inv = total_sum > 0.f ? 1.f / total_sum : 0.f;
  T* out = static_cast<T*>(p.out) + out_row * p.dim;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < p.splits; ++s)
      acc += weight[s] * p.partial_acc[(out_row * p.splits + s) * p.dim + d];
    out[d] = static_cast<T>(acc * inv);
  }
  if (threadIdx.x == 0) p.lse[out_row] = total_lse;
}

template <typename T, int VEC, int kMaxHeads>
gpu::Error launch_sparse_apply(const SparseApplyParams& p, gpu::Stream stream) {
  const int64_t rows = p.batch * p.index_heads * p.head_chunks;
  if (rows > 0) {
    const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(rows));
    sparse_apply_split_kernel<T, VEC, kMaxHeads><<<grid, apply_detail::kThreads, 0, stream>>>(p);
    const gpu::Error e = gpu::last_error();
    if (e != gpu::kSuccess) return e;
  }
  if (p.batch * p.q_heads == 0) return gpu::kSuccess;
  sparse_apply_merge_kernel<T><<<static_cast<unsigned>(p.batch * p.q_heads), 128, 0, stream>>>(p);
  return gpu::last_error();
}

}  // namespace memops
