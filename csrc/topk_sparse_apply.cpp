#include "topk_sparse_apply.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "validate.h"

namespace memops {

TopkApplyResult topk_sparse_apply_unfused(
    const at::Tensor& query, const at::Tensor& summary, const at::Tensor& k_cache,
    const at::Tensor& v_cache, int64_t k, int64_t page_size, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, const std::optional<at::Tensor>& seq_lens,
    int64_t sink_pages, int64_t recent_pages, c10::string_view group_reduce,
    std::optional<double> scale, const std::optional<at::Tensor>& summary_scales) {
  using Opt = const std::optional<at::Tensor>&;
  static const auto topk_relevancy =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("memops::topk_relevancy", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                    c10::string_view, Opt, int64_t, int64_t,
                                                    c10::string_view, Opt, Opt)>();
  static const auto sparse_apply =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("memops::sparse_apply", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, Opt, int64_t, Opt,
                                                    std::optional<double>)>();
  auto [top_scores, top_indices] =
      topk_relevancy.call(query, summary, k, mode, num_pages, sink_pages, recent_pages,
                          group_reduce, std::nullopt, summary_scales);
  auto [out, lse] =
      sparse_apply.call(query, k_cache, v_cache, top_indices, page_size, seq_lens, scale);
  return {out, lse, top_scores, top_indices};
}

namespace {

// Every backend without a kernel of its own: all arguments checked, then the two ops.
TopkApplyResult topk_sparse_apply_composite(
    const at::Tensor& query, const at::Tensor& summary, const at::Tensor& k_cache,
    const at::Tensor& v_cache, int64_t k, int64_t page_size, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, const std::optional<at::Tensor>& seq_lens,
    int64_t sink_pages, int64_t recent_pages, c10::string_view group_reduce,
    std::optional<double> scale, const std::optional<at::Tensor>& summary_scales) {
  check_topk_sparse_apply(query, summary, k_cache, v_cache, k, page_size, std::string(mode),
                          num_pages, seq_lens, sink_pages, recent_pages, std::string(group_reduce),
                          scale, summary_scales);
  return topk_sparse_apply_unfused(query, summary, k_cache, v_cache, k, page_size, mode, num_pages,
                                   seq_lens, sink_pages, recent_pages, group_reduce, scale,
                                   summary_scales);
}

}  // namespace

TORCH_LIBRARY_IMPL(memops, CompositeExplicitAutograd, m) {
  m.impl("topk_sparse_apply", &topk_sparse_apply_composite);
}

}  // namespace memops
