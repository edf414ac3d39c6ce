// Apply to Inference on the GPU: split-K decode attention (flash-decoding) over the tokens of the
// selected pages, gathered inside the kernel from strided caches. Each block takes one kv head's
// selection and a contiguous range of its pages, and serves every query head of the GQA group
// that shares the selection, so each kv page is read once for the whole group. The splits of a
// row are merged exactly by the last of its split blocks to finish (or, with
// SparseApplyParams::separate_merge, by a second kernel: the same merge code, the same bits).
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

// Where merge_splits reads the splits of its rows: the statistics of (row r, split s) at
// max[r * stat_row_stride + s] and sum[...], the unnormalised output (r, s, d) at
// acc[r * acc_row_stride + s * dim + d]. In global memory (the partials) or in the block's shared
// memory (one split: the block's own results).
struct SplitView {
  const float* max;
  const float* sum;
  const float* acc;
  int64_t stat_row_stride, acc_row_stride;
};

// Shared memory of merge_splits for up to kRows rows.
template <int kRows>
struct MergeShared {
  float weight[kRows][apply_detail::kMaxSplits];  // first the splits' maxima, then their weights
  float split_sum[kRows][apply_detail::kMaxSplits];
  float row_max[kRows], total_sum[kRows];
};

// kL2: the view is in global memory, written by other blocks of this launch (read from L2).
template <bool kL2>
__device__ __forceinline__ float load_split(const float* p) {
  if constexpr (kL2) {
    return gpu::load_l2(p);
  } else {
    return *p;
  }
}

// The element phase of merge_splits with kPer elements a thread (rows * dim <= kThreads * kPer):
// each element sums its splits in split order; the loads of kUnroll splits of all kPer elements
// (16 in all) are issued before their multiply-adds, so that they are in flight together.
template <typename T, int kRows, int kThreads, int kPer, bool kL2>
__device__ __forceinline__ void merge_split_elements(const SparseApplyParams& p, int64_t first_row,
                                                     int64_t count, int64_t splits,
                                                     const SplitView& view,
                                                     const MergeShared<kRows>& shared) {
  constexpr int kUnroll = 16 / kPer;
  // 32-bit offsets: at most kRows * kMaxSplits * kMaxDim elements.
  const int dim = static_cast<int>(p.dim), n = static_cast<int>(count);
  const int split_count = static_cast<int>(splits), row_stride = static_cast<int>(view.acc_row_stride);
  int row[kPer], offset[kPer];
  float acc[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * kThreads;
    row[k] = i < n ? i / dim : 0;
    offset[k] = row[k] * row_stride + (i < n ? i % dim : 0);
    acc[k] = 0.f;
  }
  const auto active = [&](int k) { return static_cast<int>(threadIdx.x) + k * kThreads < n; };
  int s = 0;
  for (; s + kUnroll <= split_count; s += kUnroll) {
    float v[kUnroll][kPer];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        v[u][k] = active(k) ? load_split<kL2>(view.acc + offset[k] + (s + u) * dim) : 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < kPer; ++k) acc[k] = fmaf(shared.weight[row[k]][s + u], v[u][k], acc[k]);
  }
  for (; s < split_count; ++s) {
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (active(k))
        acc[k] = fmaf(shared.weight[row[k]][s], load_split<kL2>(view.acc + offset[k] + s * dim), acc[k]);
  }
  T* out = static_cast<T*>(p.out) + first_row * p.dim;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    if (active(k)) {
      const float total = shared.total_sum[row[k]];
      const float inv = total > 0.f ? 1.f / total : 0.f;
      out[threadIdx.x + k * kThreads] = static_cast<T>(acc[k] * inv);
    }
  }
}

// merge_split_elements with the fewest elements a thread that cover `count` (so that fewer heads,
// e.g. a GQA group of 4 in a block for 8, keep 16 loads in flight over more splits).
template <typename T, int kRows, int kThreads, int kPer, bool kL2>
__device__ __forceinline__ void merge_split_elements_fit(const SparseApplyParams& p, int64_t first_row,
                                                         int64_t count, int64_t splits,
                                                         const SplitView& view,
                                                         const MergeShared<kRows>& shared) {
  if constexpr (kPer > 1) {
    if (count <= int64_t(kThreads) * (kPer / 2))
      return merge_split_elements_fit<T, kRows, kThreads, kPer / 2, kL2>(p, first_row, count, splits,
                                                                         view, shared);
  }
  merge_split_elements<T, kRows, kThreads, kPer, kL2>(p, first_row, count, splits, view, shared);
}

// The exact combination of `splits` splits of the output rows first_row .. first_row + rows - 1
// (consecutive rows of out [B * Hq, D] and lse), by the kThreads threads of the calling block
// (rows <= kThreads, dim <= kDim). The sums run sequentially in split order with explicit fused
// multiply-adds: thread r takes the max of row r's splits and sums their weighted sums, each
// element sums its splits. Loads and the weights' exponentials run in parallel. The separate
// merge kernel and the merge in a split kernel's last block both run this, so they give the
// same bits. Every thread of the block must call it (it has barriers).
template <typename T, int kRows, int kThreads, int kDim, bool kL2>
__device__ __forceinline__ void merge_splits(const SparseApplyParams& p, int64_t first_row, int rows,
                                             int64_t splits, const SplitView& view,
                                             MergeShared<kRows>& shared) {
  const int64_t stats = int64_t(rows) * splits;
  for (int64_t i = threadIdx.x; i < stats; i += kThreads) {
    const int64_t r = i / splits, s = i % splits;
    shared.weight[r][s] = load_split<kL2>(view.max + r * view.stat_row_stride + s);
    shared.split_sum[r][s] = load_split<kL2>(view.sum + r * view.stat_row_stride + s);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < rows) {
    float m = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) m = fmax32(m, shared.weight[threadIdx.x][s]);
    shared.row_max[threadIdx.x] = m;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < stats; i += kThreads) {
    const int64_t r = i / splits, s = i % splits;
    const float split_max = shared.weight[r][s];
    shared.weight[r][s] = split_max == -INFINITY ? 0.f : expf(split_max - shared.row_max[r]);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < rows) {
    const int r = threadIdx.x;
    float l = 0.f;
    for (int64_t s = 0; s < splits; ++s) l = fmaf(shared.weight[r][s], shared.split_sum[r][s], l);
    shared.total_sum[r] = l;
    p.lse[first_row + r] = l > 0.f ? shared.row_max[r] + logf(l) : -INFINITY;
  }
  __syncthreads();
  constexpr int kPer = (kRows * kDim + kThreads - 1) / kThreads;
  static_assert(kPer >= 1 && kPer <= 16 && (kPer & (kPer - 1)) == 0,
                "merge_splits: a power of two, at most 16, elements a thread");
  merge_split_elements_fit<T, kRows, kThreads, kPer, kL2>(p, first_row, int64_t(rows) * p.dim, splits,
                                                          view, shared);
}

// Called by every thread of a split block after it wrote its partials: publishes them and counts
// the block done on its row (`done`: the row's counter, zeroed before the launch; `splits`: the
// row's split blocks). True in the row's last block to finish (the same in all its threads),
// which then sees every split's partials through load_split<true>. The counter is left at
// `splits` (a fresh one every call).
__device__ __forceinline__ bool last_split_block(int* done, int splits) {
  __shared__ bool last;
  __threadfence();  // this block's partials are visible device-wide before it counts itself
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1) == splits - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}
// The same for a grid whose x blocks are the row's splits.
__device__ __forceinline__ bool last_split_block(int* done) {
  return last_split_block(done, static_cast<int>(gridDim.x));
}

// Value errors of one split block (the out-of-range rule has already been applied): each page
// slot of the split once (the caller passes head chunk 0 only), seq_lens[b] once per batch row.
// Shared by the CUDA-core and the tensor-core split kernels.
__device__ inline void report_split_value_errors(const SparseApplyParams& p, const int32_t* index_list,
                                                 int64_t slot_begin, int64_t slot_end, int64_t total_pages,
                                                 int64_t b, int64_t split, int64_t index_head) {
  int32_t errors = 0;
  if (index_list != nullptr)
    for (int64_t slot = slot_begin + threadIdx.x; slot < slot_end; slot += blockDim.x) {
      // From L2: in the one-launch step another block of the launch wrote the indices.
      const int32_t page = gpu::load_l2(index_list + slot);
      if (page < -1 || page >= total_pages) errors |= kValueErrorIndex;
    }
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
  __shared__ MergeShared<kMaxHeads> merge;

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

  // Sum the stripes' accumulators in a fixed order (deterministic), then write the partials (or,
  // with one split, the output).
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
  if (p.value_errors != nullptr && chunk == 0)
    report_split_value_errors(p, index_list, slot_begin, slot_end, total_pages, b, split, index_head);
  const int64_t first_row = b * p.q_heads + first_head;
  if (p.splits == 1 && !p.separate_merge) {  // the block's results are the output rows
    const SplitView own{running_max, running_sum, reduced, 1, dim};
    merge_splits<T, kMaxHeads, kThreads, kMaxDim, false>(p, first_row, heads, 1, own, merge);
    return;
  }
  for (int64_t i = threadIdx.x; i < int64_t(heads) * dim; i += blockDim.x) {
    const int64_t g = i / dim, d = i % dim;
    p.partial_acc[((first_row + g) * p.splits + split) * dim + d] = reduced[i];
  }
  if (threadIdx.x < heads) {
    p.partial_max[(first_row + threadIdx.x) * p.splits + split] = running_max[threadIdx.x];
    p.partial_sum[(first_row + threadIdx.x) * p.splits + split] = running_sum[threadIdx.x];
  }
  if (p.separate_merge || !last_split_block(p.split_done + blockIdx.y)) return;
  const SplitView partials{p.partial_max + first_row * p.splits, p.partial_sum + first_row * p.splits,
                           p.partial_acc + first_row * p.splits * dim, p.splits, p.splits * dim};
  merge_splits<T, kMaxHeads, kThreads, kMaxDim, true>(p, first_row, heads, p.splits, partials, merge);
}

// One block per (b, query head): the exact combination of the splits, when they are merged by a
// kernel of their own (SparseApplyParams::separate_merge).
constexpr int kApplyMergeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kApplyMergeThreads) sparse_apply_merge_kernel(SparseApplyParams p) {
  __shared__ MergeShared<1> merge;
  const int64_t row = blockIdx.x;
  const SplitView partials{p.partial_max + row * p.splits, p.partial_sum + row * p.splits,
                           p.partial_acc + row * p.splits * p.dim, p.splits, p.splits * p.dim};
  merge_splits<T, 1, kApplyMergeThreads, apply_detail::kMaxDim, false>(p, row, 1, p.splits, partials,
                                                                        merge);
}

// For both split kernels' launchers: a merge in the split kernel needs its counters (splits > 1).
inline gpu::Error check_split_merge(const SparseApplyParams& p) {
  if (!p.separate_merge && p.splits > 1 && p.split_done == nullptr) return gpu::kInvalidValue;
  return gpu::kSuccess;
}

// The separate merge kernel, when asked for (after either split kernel).
template <typename T>
gpu::Error launch_separate_merge(const SparseApplyParams& p, gpu::Stream stream) {
  if (!p.separate_merge || p.batch * p.q_heads == 0) return gpu::kSuccess;
  sparse_apply_merge_kernel<T>
      <<<static_cast<unsigned>(p.batch * p.q_heads), kApplyMergeThreads, 0, stream>>>(p);
  return gpu::last_error();
}

template <typename T, int VEC, int kMaxHeads>
gpu::Error launch_sparse_apply(const SparseApplyParams& p, gpu::Stream stream) {
  const int64_t rows = p.batch * p.index_heads * p.head_chunks;
  if (rows > 0) {
    const gpu::Error checked = check_split_merge(p);
    if (checked != gpu::kSuccess) return checked;
    const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(rows));
    sparse_apply_split_kernel<T, VEC, kMaxHeads><<<grid, apply_detail::kThreads, 0, stream>>>(p);
    const gpu::Error e = gpu::last_error();
    if (e != gpu::kSuccess) return e;
  }
  return launch_separate_merge<T>(p, stream);
}

}  // namespace memops
