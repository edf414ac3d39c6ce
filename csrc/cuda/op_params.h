// Kernel parameters filled from an op's tensors, shared by the bindings that launch the same
// kernels (topk_relevancy, sparse_apply, and topk_sparse_apply, which runs both in one launch).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "memops/gpu_params.h"

namespace memops {

// Scoring of `summary` for `query` into `scores` [B, Hkv, N] float32; `weights`: the indexer's
// float32 [B, Hq] contiguous, or undefined; `num_pages`: int32 [B] contiguous data or nullptr.
RelevancyParams relevancy_params(const at::Tensor& query, const at::Tensor& summary,
                                 at::Tensor& scores, const std::string& mode,
                                 const std::string& group_reduce, const at::Tensor& weights,
                                 const int32_t* num_pages);
// The top-k of `scores` [rows, N] into top_scores / top_indices [rows, k].
SelectParams select_params(const at::Tensor& scores, const int32_t* num_pages,
                           at::Tensor& top_scores, at::Tensor& top_indices, int64_t k,
                           int64_t sink_pages, int64_t recent_pages);
// Attention of `query` over `indices` (int32 [B, index_heads, slots] contiguous data, or nullptr
// for every page) into out / lse; `seq_lens`: int32 [B] contiguous data or nullptr. The split
// plan and the partials are the caller's.
SparseApplyParams sparse_apply_params(const at::Tensor& query, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const int32_t* indices,
                                      int64_t index_heads, int64_t slots, const int32_t* seq_lens,
                                      at::Tensor& out, at::Tensor& lse, int64_t page_size,
                                      std::optional<double> scale);
// Float32 split partials for `p`'s plan (unnormalised outputs [B * Hq, splits, D], then maxima and
// sums [B * Hq, splits]) in one buffer, which the caller keeps for the launch; sets
// p.partial_acc, partial_max and partial_sum.
at::Tensor attach_split_partials(SparseApplyParams& p, const at::Tensor& query);

}  // namespace memops
