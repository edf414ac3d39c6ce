// topk_sparse_apply as its two ops: topk_relevancy, then sparse_apply over the pages it selected.
// Every backend without a one-launch kernel runs this (registered for
// CompositeExplicitAutograd); the CUDA binding runs it where its fused kernel does not apply.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace memops {

using TopkApplyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (out, lse, top_scores, top_indices), through the dispatcher: each op runs its backend's kernel
// and checks its own arguments. The caller has run check_topk_sparse_apply (the checks that span
// both ops), so that a bad argument fails before either op computes anything.
TopkApplyResult topk_sparse_apply_unfused(
    const at::Tensor& query, const at::Tensor& summary, const at::Tensor& k_cache,
    const at::Tensor& v_cache, int64_t k, int64_t page_size, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, const std::optional<at::Tensor>& seq_lens,
    int64_t sink_pages, int64_t recent_pages, c10::string_view group_reduce,
    std::optional<double> scale, const std::optional<at::Tensor>& summary_scales);

}  // namespace memops
