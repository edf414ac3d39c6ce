// Apply to Inference on tensor cores (CUDA sm_80+, 16-bit caches, D of 64 or 128, up to 8 query
// heads per block): split-K decode attention over the selected pages, flash-decoding style.
//
// Each warp walks its own tiles of 16 tokens (no block barrier in the token loop) and keeps an
// online softmax for the block's heads. Per tile, two small matrix products on the tensor cores:
//   S^T [16 tokens x 8 heads] = K [16 x D] . Q^T [D x 8]
//   O^T [D x 8 heads]        += V^T [D x 16 tokens] . P^T [16 x 8]
// K and V rows are loaded straight from the strided caches into registers with 16-byte loads
// (each kv page read once for the whole GQA group); the element order inside a k-step is chosen
// so that the loaded registers are the fragments (K, Q) or become them with byte permutes (V).
// P^T is moved from the accumulator layout to the B-fragment layout by an 8x8 register
// transpose. P is rounded to the cache's 16-bit type for the second product (as FlashAttention
// does); the softmax denominator sums the float32 values. The warps of a block are merged at the
// end, the splits by the row's last split block (merge_splits, as the portable kernel).
#pragma once

#include "memops/mma.cuh"
#include "memops/sparse_apply.cuh"

namespace memops {

namespace apply_tc {

constexpr int kWarps = 4;  // of sparse_apply_tc_kernel
constexpr int kThreads = kWarps * 32;
constexpr int kTileTokens = 16;
constexpr int kMaxHeads = static_cast<int>(kTensorCoreMaxHeads);
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace apply_tc

// Split `split` of row `y` = (b, index head, head chunk), by a block of kWarps warps: the work of
// one block of sparse_apply_tc_kernel, and of an apply item of the one-launch decode step
// (topk_sparse_apply_tc.cuh). kIndicesInL2: the indices were written by another block of the
// same launch (read from L2). The row's splits are merged by its last block to finish
// (p.split_done), by the merge kernel (p.separate_merge), or, with one split, by this block.
template <typename T, int D, int kWarps, bool kIndicesInL2>
__device__ __forceinline__ void apply_tc_split(const SparseApplyParams& p, int64_t split, int64_t y) {
  using namespace apply_tc;
  static_assert(D == 64 || D == 128, "register budget: D of 64 or 128");
  constexpr int kThreads = kWarps * 32;
  constexpr int kChunks = D / 32;        // K: 16-byte loads per token row and lane
  constexpr int kSteps = D / 16;         // k-steps of S^T
  constexpr int kValueLoads = D / 64;    // V: 16-byte loads per token and lane (D / 8 elements)
  constexpr int kMTiles = D / 16;        // m-tiles of O^T
  constexpr int kValueSpan = D / 8;      // V elements of one lane: d = kValueSpan * g + ...
  __shared__ int64_t token_offset[kWarps][2][kTileTokens];  // K, V element offsets; -1 masked
  __shared__ float merge_max[kWarps][kMaxHeads], merge_sum[kWarps][kMaxHeads];
  __shared__ float merge_acc[kWarps][kMaxHeads][D];
  __shared__ float block_max[kMaxHeads], block_sum[kMaxHeads];  // one split: the block's results
  __shared__ MergeShared<kMaxHeads> merge;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t chunk = y % p.head_chunks;
  const int64_t index_row = y / p.head_chunks;
  const int64_t b = index_row / p.index_heads, index_head = index_row % p.index_heads;
  const bool per_query_head = p.index_heads != p.kv_heads;
  const int64_t kv = per_query_head ? index_head / group : index_head;
  const int64_t row_first_head = per_query_head ? index_head : kv * group;
  const int64_t row_heads = per_query_head ? 1 : group;
  const int64_t first_head = row_first_head + chunk * kMaxHeads;
  const int heads = static_cast<int>(min64(kMaxHeads, row_heads - chunk * kMaxHeads));
  const int64_t slot_begin = split * p.slots_per_split;
  const int64_t slot_end = min64(slot_begin + p.slots_per_split, p.slots);
  int64_t length = p.seq_lens == nullptr ? p.tokens : p.seq_lens[b];
  length = min64(max64(length, 0), p.tokens);
  const int64_t total_pages = ceil_div(p.tokens, p.page_size);
  const int32_t* index_list = p.indices == nullptr ? nullptr : p.indices + index_row * p.slots;
  const T* k_base = static_cast<const T*>(p.k_cache) + b * p.k_stride[0] + kv * p.k_stride[1];
  const T* v_base = static_cast<const T*>(p.v_cache) + b * p.v_stride[0] + kv * p.v_stride[1];

  // B fragments of S^T: head g, elements 32c + 8t .. 32c + 8t + 7 (k-steps 2c, 2c + 1).
  uint32_t q_frag[kSteps][2];
  {
    const T* q_row = static_cast<const T*>(p.query) + b * p.query_stride[0] +
                     (first_head + min64(g, heads - 1)) * p.query_stride[1];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint4 v = g < heads ? mma::load16(q_row + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
      q_frag[2 * c][0] = v.x;
      q_frag[2 * c][1] = v.y;
      q_frag[2 * c + 1][0] = v.z;
      q_frag[2 * c + 1][1] = v.w;
    }
  }
  const float scale_log2 = p.scale * kLog2e;
  // Running max (log2 units) and this lane's share of the sum, heads 2t and 2t + 1.
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};
  // acc[m][0], [1]: d = kValueSpan * g + 2m, heads 2t, 2t + 1; acc[m][2], [3]: d + 1.
  float acc[kMTiles][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[m][i] = 0.f;

  const int64_t split_tokens = (slot_end - slot_begin) * p.page_size;
  const int64_t tiles = ceil_div(split_tokens, kTileTokens);
  // Lanes 0..15: the page of token `lane` of a tile (-1 past the split). Read one tile ahead, so
  // that the index load overlaps the current tile's loads and math.
  const auto page_of_token = [&](int64_t tile) -> int64_t {
    const int64_t j = tile * kTileTokens + lane;
    if (lane >= kTileTokens || j >= split_tokens) return -1;
    const int64_t slot = slot_begin + j / p.page_size;
    if (index_list == nullptr) return slot;
    if constexpr (kIndicesInL2) {
      return gpu::load_l2(index_list + slot);
    } else {
      return index_list[slot];
    }
  };
  int64_t next_page = page_of_token(warp);
  for (int64_t tile = warp; tile < tiles; tile += kWarps) {
    __syncwarp();  // the previous tile's offsets have been read
    if (lane < kTileTokens) {
      const int64_t j = tile * kTileTokens + lane;
      const int64_t page = next_page;
      const int64_t token = page * p.page_size + j % p.page_size;
      const bool attended = j < split_tokens && page >= 0 && page < total_pages && token < length;
      token_offset[warp][0][lane] = attended ? token * p.k_stride[2] : -1;
      token_offset[warp][1][lane] = attended ? token * p.v_stride[2] : -1;
    }
    __syncwarp();
    next_page = page_of_token(tile + kWarps);
    const int64_t key_lo = token_offset[warp][0][g], key_hi = token_offset[warp][0][g + 8];
    // V tokens of this lane: 2t, 2t + 1, 2t + 8, 2t + 9 (the B-fragment rows of P^T).
    int64_t value_at[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) value_at[i] = token_offset[warp][1][2 * t + (i & 1) + 8 * (i / 2)];

    uint4 k_lo[kChunks], k_hi[kChunks], v[4][kValueLoads];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      k_lo[c] = key_lo >= 0 ? mma::load16(k_base + key_lo + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
      k_hi[c] = key_hi >= 0 ? mma::load16(k_base + key_hi + 32 * c + 8 * t) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int l = 0; l < kValueLoads; ++l)
        v[i][l] = value_at[i] >= 0
                      ? mma::load16(v_base + value_at[i] + kValueSpan * g + 8 * l)
                      : make_uint4(0, 0, 0, 0);  // masked tokens: zeros, never stale data

    // s[0], s[1]: token g, heads 2t, 2t + 1; s[2], s[3]: token g + 8.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {mma::word(k_lo[c], 2 * h), mma::word(k_hi[c], 2 * h),
                               mma::word(k_lo[c], 2 * h + 1), mma::word(k_hi[c], 2 * h + 1)};
        mma::mma_16816<T>(s, a, q_frag[2 * c + h]);
      }
    }
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = (i < 2 ? key_lo : key_hi) >= 0 ? s[i] * scale_log2 : -INFINITY;

    // Online softmax per head over the tile's 16 tokens (lanes 4g + t share t).
    float prob[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float tile_max = fmax32(x[j], x[j + 2]);
#pragma unroll
      for (int off = 4; off < 32; off *= 2)
        tile_max = fmax32(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
      const float new_max = fmax32(run_max[j], tile_max);
      const float factor = run_max[j] == -INFINITY ? 0.f : exp2f(run_max[j] - new_max);
      prob[j] = new_max == -INFINITY ? 0.f : exp2f(x[j] - new_max);
      prob[j + 2] = new_max == -INFINITY ? 0.f : exp2f(x[j + 2] - new_max);
      run_sum[j] = run_sum[j] * factor + prob[j] + prob[j + 2];
      run_max[j] = new_max;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        acc[m][j] *= factor;
        acc[m][j + 2] *= factor;
      }
    }

    // P^T [tokens x heads] -> B fragments (rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column g).
    const uint32_t b_frag[2] = {mma::transpose_8x8(mma::pack_pair<T>(prob[0], prob[1])),
                                mma::transpose_8x8(mma::pack_pair<T>(prob[2], prob[3]))};
    // A fragment of m-tile m: rows g, g + 8 = d of word m of this lane's V span, columns the
    // tokens 2t, 2t + 1 (a[0], a[1]) and 2t + 8, 2t + 9 (a[2], a[3]).
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      const uint32_t w0 = mma::word(v[0][m / 4], m % 4), w1 = mma::word(v[1][m / 4], m % 4);
      const uint32_t w2 = mma::word(v[2][m / 4], m % 4), w3 = mma::word(v[3][m / 4], m % 4);
      const uint32_t a[4] = {__byte_perm(w0, w1, 0x5410), __byte_perm(w0, w1, 0x7632),
                             __byte_perm(w2, w3, 0x5410), __byte_perm(w2, w3, 0x7632)};
      mma::mma_16816<T>(acc[m], a, b_frag);
    }
  }

  // Warp totals: the sums over the eight lanes that share t; then the block's warps merged.
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int off = 4; off < 32; off *= 2)
      run_sum[j] += __shfl_xor_sync(0xffffffffu, run_sum[j], off);
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    const int d = kValueSpan * g + 2 * m;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      merge_acc[warp][2 * t + j][d] = acc[m][j];
      merge_acc[warp][2 * t + j][d + 1] = acc[m][j + 2];
    }
  }
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      merge_max[warp][2 * t + j] = run_max[j];
      merge_sum[warp][2 * t + j] = run_sum[j];
    }
  }
  __syncthreads();
  // One split (and the merge in this kernel): the block's results stay in shared memory, the
  // accumulators in merge_acc[0] (each element is read and then written by the same thread).
  const bool own_output = p.splits == 1 && !p.separate_merge;
  const int64_t first_row = b * p.q_heads + first_head;
  for (int i = threadIdx.x; i < heads * D; i += kThreads) {
    const int head = i / D, d = i % D;
    float warps_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) warps_max = fmax32(warps_max, merge_max[w][head]);
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = merge_max[w][head] == -INFINITY ? 0.f
                                                           : exp2f(merge_max[w][head] - warps_max);
      total += weight * merge_acc[w][head][d];
    }
    const int64_t out_row = first_row + head;
    if (own_output)
      merge_acc[0][head][d] = total;
    else
      p.partial_acc[(out_row * p.splits + split) * D + d] = total;
    if (d == 0) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = merge_max[w][head] == -INFINITY
                                 ? 0.f
                                 : exp2f(merge_max[w][head] - warps_max);
        sum += weight * merge_sum[w][head];
      }
      const float natural_max = warps_max == -INFINITY ? -INFINITY : warps_max * kLn2;
      if (own_output) {
        block_max[head] = natural_max;
        block_sum[head] = sum;
      } else {
        p.partial_max[out_row * p.splits + split] = natural_max;
        p.partial_sum[out_row * p.splits + split] = sum;
      }
    }
  }
  if (p.value_errors != nullptr && chunk == 0)
    report_split_value_errors(p, index_list, slot_begin, slot_end, total_pages, b, split, index_head);
  if (own_output) {
    __syncthreads();
    const SplitView own{block_max, block_sum, &merge_acc[0][0][0], 1, D};
    merge_splits<T, kMaxHeads, kThreads, D, false>(p, first_row, heads, 1, own, merge);
    return;
  }
  if (p.separate_merge || !last_split_block(p.split_done + y, static_cast<int>(p.splits))) return;
  const SplitView partials{p.partial_max + first_row * p.splits, p.partial_sum + first_row * p.splits,
                           p.partial_acc + first_row * p.splits * D, p.splits, p.splits * D};
  merge_splits<T, kMaxHeads, kThreads, D, true>(p, first_row, heads, p.splits, partials, merge);
}

// Grid: x = split, y = (b, index head, head chunk), as sparse_apply_split_kernel.
template <typename T, int D>
__global__ void __launch_bounds__(apply_tc::kThreads, 4)
    sparse_apply_tc_kernel(SparseApplyParams p) {
  apply_tc_split<T, D, apply_tc::kWarps, false>(p, blockIdx.x, blockIdx.y);
}

template <typename T>
gpu::Error launch_sparse_apply_tc(const SparseApplyParams& p, gpu::Stream stream) {
  const int64_t rows = p.batch * p.index_heads * p.head_chunks;
  if (rows > 0) {
    const gpu::Error checked = check_split_merge(p);
    if (checked != gpu::kSuccess) return checked;
    const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(rows));
    if (p.dim == 64)
      sparse_apply_tc_kernel<T, 64><<<grid, apply_tc::kThreads, 0, stream>>>(p);
    else
      sparse_apply_tc_kernel<T, 128><<<grid, apply_tc::kThreads, 0, stream>>>(p);
    const gpu::Error e = gpu::last_error();
    if (e != gpu::kSuccess) return e;
  }
  return launch_separate_merge<T>(p, stream);
}

}  // namespace memops
