// Parameters of the GPU kernels (raw pointers, sizes, element strides) and the host-side launch
// planning that depends on shapes only. Plain C++: the torch bindings, compiled by the host
// compiler, fill these in; the kernels (*.cuh) read them.
#pragma once

#include <cstdint>

#include "memops/common.h"

namespace memops {

// Bits of the device-side value-error word (torch_memops.value_errors): a kernel that applies
// the out-of-range rule of docs/design.md to a value ORs in its bit. Checked once per page or
// row, never per element.
constexpr int32_t kValueErrorIndex = 1;     // a page index outside [-1, N)
constexpr int32_t kValueErrorSeqLen = 2;    // seq_lens outside [0, S]
constexpr int32_t kValueErrorNumPages = 4;  // num_pages outside [0, N]

// Largest head dim of the GPU kernels (their per-thread slices live in registers).
constexpr int64_t kGpuMaxDim = 256;
// Tokens per step of a sparse_apply block, and the most splits of one row.
constexpr int64_t kApplyTile = 128;
constexpr int64_t kApplyMaxSplits = 128;
// Query heads one sparse_apply block serves at most (their accumulators live in registers).
constexpr int64_t kApplyMaxHeads = 8;

struct PrepareMemoryParams {
  const void* keys;
  void* summary;
  const int32_t* seq_lens;  // [B] or nullptr (all S); clamped to [0, S]
  int64_t batch, heads, tokens, dim, page_size;
  int64_t first_page, num_pages;  // pages first_page .. num_pages-1 are written
  int64_t key_stride[3];          // b, h, s (elements); d is dense
  int64_t summary_stride[4];      // b, h, n, r
  SummaryMode mode;
  int32_t* value_errors;  // the value-error word, or nullptr (record nothing)
};

struct RelevancyParams {
  const void* query;       // [B, Hq, D]
  const void* summary;     // [B, Hkv, N, R, D]
  const float* weights;    // indexer only: [B, Hq] contiguous float32
  const int32_t* num_pages;  // [B] or nullptr; clamped to [0, N]
  float* scores;           // [B, Hkv, N] contiguous; pages past num_pages are not written
  int64_t batch, q_heads, kv_heads, pages, reps, dim;
  int64_t query_stride[2];    // b, h
  int64_t summary_stride[4];  // b, h, n, r
  RelevancyMode mode;
  GroupReduce reduce;
};

struct SelectParams {
  const float* scores;        // [rows, N] contiguous
  const int32_t* num_pages;   // [B] or nullptr
  float* top_scores;          // [rows, k]
  int32_t* top_indices;       // [rows, k]
  int64_t heads, pages, k, sink_pages, recent_pages;
  int32_t* value_errors;  // the value-error word, or nullptr
};

struct GatherRetrieveParams {
  const char* memory;       // [B, H, S, D] bytes; strides in bytes below
  const int32_t* indices;   // [B, H, k] contiguous
  const int32_t* seq_lens;  // [B] or nullptr; clamped to [0, S]
  char* out;                // [B, H, k * P, D] contiguous
  int32_t* lengths;         // [B, H]
  int64_t batch, heads, tokens, row_bytes, page_size, k;
  int64_t memory_stride[3];  // b, h, s in bytes
  int32_t* value_errors;     // the value-error word, or nullptr
};

struct SparseApplyParams {
  const void* query;        // [B, Hq, D]
  const void* k_cache;      // [B, Hkv, S, D]
  const void* v_cache;      // [B, Hkv, S, D]
  const int32_t* indices;   // [B, index_heads, slots] contiguous; nullptr = every page (dense)
  const int32_t* seq_lens;  // [B] or nullptr; clamped to [0, S]
  float* partial_acc;       // [B * Hq, splits, D] unnormalised outputs
  float* partial_max;       // [B * Hq, splits] running max of the logits
  float* partial_sum;       // [B * Hq, splits] sum of exp(logit - max)
  void* out;                // [B, Hq, D] contiguous
  float* lse;               // [B, Hq]
  int64_t batch, q_heads, kv_heads, tokens, dim, page_size;
  int64_t index_heads;      // kv_heads or q_heads (or kv_heads when dense)
  int64_t slots;            // k, or ceil(S / P) when dense
  int64_t slots_per_split, splits;
  int64_t head_chunks;      // blocks per index row along the query heads it serves
  int64_t query_stride[2];  // b, h
  int64_t k_stride[3];      // b, h, s
  int64_t v_stride[3];
  float scale;
  int32_t* value_errors;    // the value-error word, or nullptr
  // The splits of a row are merged by its last split block to finish, which it learns from
  // split_done ([B * index_heads * head_chunks] counters, zeroed before the launch; unused and
  // may be nullptr with one split, whose block writes out and lse itself), or, with
  // separate_merge, by a kernel of their own (every split then writes partials).
  int* split_done;
  bool separate_merge;
};

struct MergeAttentionParams {
  const void* out_a;  // [rows, D] contiguous
  const void* out_b;
  const float* lse_a;  // [rows]
  const float* lse_b;
  void* out;
  float* lse;
  int64_t rows, dim;
};

// Chooses the split of the page list so that about `target_blocks` blocks run; depends on
// shapes only (never on seq_lens or indices), so the launch is the same in every graph replay.
inline void plan_sparse_apply(SparseApplyParams& p, int max_heads_per_block, int target_blocks) {
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t row_heads = p.index_heads != p.kv_heads ? 1 : group;
  p.head_chunks = ceil_div(row_heads, max_heads_per_block);
  const int64_t rows = p.batch * p.index_heads * p.head_chunks;
  const int64_t max_splits =
      max64(1, min64(kApplyMaxSplits, ceil_div(p.slots * p.page_size, kApplyTile)));
  const int64_t wanted = max64(1, min64(max_splits, ceil_div(target_blocks, max64(rows, 1))));
  p.slots_per_split = max64(1, ceil_div(p.slots, wanted));
  p.splits = max64(1, ceil_div(p.slots, p.slots_per_split));
}

// Query heads of one GQA group that the tensor-core kernels serve at once (the N of an m16n8k16
// product), and the longest rows whose top-k is selected inside the scoring kernel (their keys
// sit in shared memory).
constexpr int64_t kTensorCoreMaxHeads = 8;
// Index heads the tensor-core indexer reduces per kv row (eight n-tiles of 8).
constexpr int64_t kTensorCoreMaxIndexHeads = 64;
constexpr int64_t kFusedSelectMaxPages = 8192;  // select_detail::kSmallMaxPages
// The longest rows topk_relevancy selects in the scoring kernel by default (12 keys a thread of
// the scoring block's 256). Longer rows go to the selection kernel, whose 1024 threads hold 8 keys
// each where the scoring block's 256 hold 32: on an H200 (tools/probe_scoring.cu) 8192-page rows
// took 8 us less that way at Llama-3-8B shapes, batch 1 and 8, while rows of 2048 pages gained
// 2-2.6 us from the fused selection. 3072 and not 2048: a static cache of 32K tokens and its new
// tokens has 2049 pages and more.
constexpr int64_t kFusedSelectDefaultMaxPages = 3072;

// Whether the tensor-core scoring kernel (topk_relevancy_tc.cuh) takes these parameters; the
// binding checks the device (sm_80+).
inline bool relevancy_tc_supported(const RelevancyParams& p, bool vectorized, bool sixteen_bit) {
  const int64_t group = p.q_heads / p.kv_heads;
  const bool indexer = p.mode == RelevancyMode::kIndexer;
  const bool mode_ok = (p.mode == RelevancyMode::kBound && p.reps == 2) ||
                       (p.mode == RelevancyMode::kDot && (p.reps == 1 || p.reps == 2)) ||
                       (indexer && p.reps == 1);
  return sixteen_bit && vectorized && mode_ok && (p.dim == 64 || p.dim == 128) && group >= 1 &&
         group <= (indexer ? kTensorCoreMaxIndexHeads : kTensorCoreMaxHeads);
}

// Whether the tensor-core sparse_apply kernel (sparse_apply_tc.cuh) takes these parameters.
inline bool sparse_apply_tc_supported(const SparseApplyParams& p, bool vectorized,
                                      bool sixteen_bit) {
  return sixteen_bit && vectorized && (p.dim == 64 || p.dim == 128);
}

// The decode step of one layer in one launch (topk_sparse_apply_tc.cuh): topk_relevancy's
// scoring and selection, then sparse_apply over the selected pages, as work items that the
// blocks of one grid take in order (every scoring item before any apply item).
struct TopkApplyParams {
  RelevancyParams relevancy;
  SelectParams select;      // top_indices: [rows, k], read by the apply items
  SparseApplyParams apply;  // indices = select.top_indices; split_done = the third counter range
  // [1 + 3 * rows] ints, zeroed before the launch: the next item, then per (b, kv) row its
  // scoring items done, its selection published (0 / 1) and its split blocks done.
  int* counters;
  int64_t score_blocks;  // scoring items per row (each a block's share of the row's tiles)
};

// Whether the one-launch step takes these parameters: both tensor-core kernels do, the
// selection fits the scoring block (rows of up to kFusedSelectMaxPages pages), one selection
// per GQA group (index_heads == kv_heads) and at most kTensorCoreMaxHeads query heads a group.
inline bool topk_sparse_apply_tc_supported(const TopkApplyParams& p, bool vectorized,
                                           bool sixteen_bit) {
  return relevancy_tc_supported(p.relevancy, vectorized, sixteen_bit) &&
         p.relevancy.mode != RelevancyMode::kIndexer && p.relevancy.pages <= kFusedSelectMaxPages &&
         sparse_apply_tc_supported(p.apply, vectorized, sixteen_bit) &&
         p.apply.index_heads == p.apply.kv_heads &&
         p.apply.q_heads / p.apply.kv_heads <= kTensorCoreMaxHeads;
}

// Work items of the one-launch step, from shapes only (capturable): as many scoring items a row
// as relevancy_tc_kernel has blocks, and splits of at least 128 tokens (a 16-token tile for
// each of the 8 warps) so that the apply items of all rows fill the resident blocks once.
inline void plan_topk_sparse_apply_tc(TopkApplyParams& p, int resident_blocks) {
  const int64_t rows = p.relevancy.batch * p.relevancy.kv_heads;
  const int64_t tiles = ceil_div(p.relevancy.pages, 16);
  p.score_blocks = max64(1, min64(ceil_div(tiles, 8), resident_blocks / max64(rows, 1)));
  SparseApplyParams& a = p.apply;
  a.head_chunks = 1;
  const int64_t max_splits = max64(1, min64(kApplyMaxSplits, ceil_div(a.slots * a.page_size, 128)));
  const int64_t wanted = max64(1, min64(max_splits, resident_blocks / max64(rows, 1)));
  a.slots_per_split = max64(1, ceil_div(a.slots, wanted));
  a.splits = max64(1, ceil_div(a.slots, a.slots_per_split));
}

// The tensor-core kernel (sparse_apply_tc.cuh): blocks of 4 warps serve up to 8 query heads;
// as many splits as fit the resident blocks in one wave, each at least 64 tokens (a 16-token
// tile per warp). Shapes only, as plan_sparse_apply.
inline void plan_sparse_apply_tc(SparseApplyParams& p, int resident_blocks) {
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t row_heads = p.index_heads != p.kv_heads ? 1 : group;
  p.head_chunks = ceil_div(row_heads, kTensorCoreMaxHeads);
  const int64_t rows = p.batch * p.index_heads * p.head_chunks;
  const int64_t max_splits =
      max64(1, min64(kApplyMaxSplits, ceil_div(p.slots * p.page_size, 64)));
  const int64_t wanted = max64(1, min64(max_splits, resident_blocks / max64(rows, 1)));
  p.slots_per_split = max64(1, ceil_div(p.slots, wanted));
  p.splits = max64(1, ceil_div(p.slots, p.slots_per_split));
}

}  // namespace memops
