// The decode step of one layer in one launch (CUDA sm_80+, tensor cores): Compute Relevancy ->
// top-k -> Apply, i.e. topk_relevancy followed by sparse_apply over the pages it selected.
//
// At batch 1 the three or four kernels of the step (scoring with its fused selection, the
// split kernel, the merge) each take far longer than their bytes; this kernel removes the
// launches between them (on the H200 that saved less than the single grid costs: docs/cuda.md).
// One grid of resident blocks takes work items from a counter in order:
//   items [0, rows * score_blocks):  a block's share of one (b, kv) row's tiles, scored as
//     relevancy_tc_kernel does (score_row_tiles_tc); the row's last scoring item selects its
//     top-k (select_if_last_block) and publishes the row;
//   the remaining rows * splits items: split `s` of a row, attended as sparse_apply_tc_kernel
//     does (apply_tc_split, 8 warps), after the row is published; the row's last split merges.
// A block takes an apply item only after every scoring item has been taken by a running block
// (the counter hands items out in order), and scoring waits on nothing, so the wait for a
// row's selection always ends, whatever the number of resident blocks. Rows are scored and
// attended in order: the first rows' attention overlaps the last rows' scoring.
//
// Results are those of the two ops: the same scores, the same selection (indices, scores), and
// the attention of the same tokens (8 warps a split instead of 4, and other split bounds:
// float32 sums in another order).
#pragma once

#include "memops/sparse_apply_tc.cuh"
#include "memops/topk_relevancy_tc.cuh"

namespace memops {

namespace step_tc {

constexpr int kThreads = relevancy_tc::kThreads;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads == select_detail::kSmallThreads, "a scoring block selects its row");

// Every thread of the block, after writing what the flag announces: visible device-wide first.
__device__ __forceinline__ void publish(int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicExch(flag, 1);
}

// Every thread of the block: returns once `flag` is set; what was written before it is then read
// from L2 (load_l2), never from a stale line of this multiprocessor's L1.
__device__ __forceinline__ void wait_for(const int* flag) {
  if (threadIdx.x == 0)
    while (*reinterpret_cast<const volatile int*>(flag) == 0) __nanosleep(64);
  __syncthreads();
  __threadfence();
}

}  // namespace step_tc

template <typename T, int D, int kReps, bool kBound>
__global__ void __launch_bounds__(step_tc::kThreads, 2) topk_sparse_apply_tc_kernel(TopkApplyParams p) {
  using namespace step_tc;
  __shared__ int64_t taken;
  const int64_t rows = p.relevancy.batch * p.relevancy.kv_heads;
  const int64_t score_items = rows * p.score_blocks;
  const int64_t items = score_items + rows * p.apply.splits;
  int* next_item = p.counters;
  int* scored = p.counters + 1;
  int* ready = scored + rows;
  for (;;) {
    __syncthreads();  // every thread has read `taken` (and left the previous item's shared memory)
    if (threadIdx.x == 0) taken = atomicAdd(next_item, 1);
    __syncthreads();
    const int64_t item = taken;
    if (item >= items) return;
    if (item < score_items) {
      const int64_t row = item / p.score_blocks;
      score_row_tiles_tc<T, D, kReps, kBound>(p.relevancy, row, item % p.score_blocks, p.score_blocks);
      if (select_if_last_block<kThreads>(p.select, row, scored, static_cast<int>(p.score_blocks)))
        publish(ready + row);
    } else {
      const int64_t row = (item - score_items) / p.apply.splits;
      wait_for(ready + row);
      apply_tc_split<T, D, kWarps, true>(p.apply, (item - score_items) % p.apply.splits, row);
    }
  }
}

template <typename T, int D, int kReps, bool kBound>
gpu::Error launch_topk_sparse_apply_tc_for(const TopkApplyParams& p, int resident_blocks,
                                           gpu::Stream stream) {
  const int64_t rows = p.relevancy.batch * p.relevancy.kv_heads;
  const int64_t items = rows * (p.score_blocks + p.apply.splits);
  const int64_t grid = max64(1, min64(resident_blocks, items));
  topk_sparse_apply_tc_kernel<T, D, kReps, kBound>
      <<<static_cast<unsigned>(grid), step_tc::kThreads, 0, stream>>>(p);
  return gpu::last_error();
}

// `p` planned by plan_topk_sparse_apply_tc and accepted by topk_sparse_apply_tc_supported;
// `resident_blocks`: the blocks that fit the device at once (two a multiprocessor).
template <typename T>
gpu::Error launch_topk_sparse_apply_tc(const TopkApplyParams& p, int resident_blocks,
                                       gpu::Stream stream) {
  if (p.relevancy.batch * p.relevancy.kv_heads == 0) return gpu::kSuccess;
  if (p.apply.splits > 1 && p.apply.split_done == nullptr) return gpu::kInvalidValue;
  const bool bound = p.relevancy.mode == RelevancyMode::kBound;
  if (p.relevancy.dim == 64) {
    if (bound) return launch_topk_sparse_apply_tc_for<T, 64, 2, true>(p, resident_blocks, stream);
    if (p.relevancy.reps == 1)
      return launch_topk_sparse_apply_tc_for<T, 64, 1, false>(p, resident_blocks, stream);
    return launch_topk_sparse_apply_tc_for<T, 64, 2, false>(p, resident_blocks, stream);
  }
  if (bound) return launch_topk_sparse_apply_tc_for<T, 128, 2, true>(p, resident_blocks, stream);
  if (p.relevancy.reps == 1)
    return launch_topk_sparse_apply_tc_for<T, 128, 1, false>(p, resident_blocks, stream);
  return launch_topk_sparse_apply_tc_for<T, 128, 2, false>(p, resident_blocks, stream);
}

}  // namespace memops
