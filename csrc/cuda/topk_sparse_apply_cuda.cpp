#include <torch/library.h>

#include "cuda/cuda_common.h"
#include "cuda/op_params.h"
#include "topk_sparse_apply.h"
#include "validate.h"

namespace memops {

// topk_relevancy and sparse_apply, one after the other; with MEMOPS_CUDA_FUSED_STEP=1, the decode
// step of a layer in one launch (topk_sparse_apply_tc.cuh) where that kernel applies: 16-bit
// tensors that allow 16-byte loads, tensor cores, D of 64 or 128, bound or dot scores, rows of at
// most 8192 pages, GQA groups of at most 8 query heads, a 16-bit summary. The one launch is
// opt-in: on the H200 it measured slower than the two ops in a CUDA graph (docs/cuda.md).
// Counters and partials are sized by shapes only (capturable); nothing is kept between calls.
TopkApplyResult topk_sparse_apply_cuda(
    const at::Tensor& query, const at::Tensor& summary, const at::Tensor& k_cache,
    const at::Tensor& v_cache, int64_t k, int64_t page_size, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, const std::optional<at::Tensor>& seq_lens,
    int64_t sink_pages, int64_t recent_pages, c10::string_view group_reduce,
    std::optional<double> scale, const std::optional<at::Tensor>& summary_scales) {
  const auto unfused = [&] {
    return topk_sparse_apply_unfused(query, summary, k_cache, v_cache, k, page_size, mode, num_pages,
                                     seq_lens, sink_pages, recent_pages, group_reduce, scale,
                                     summary_scales);
  };
  const std::string mode_s(mode), reduce_s(group_reduce);
  check_topk_sparse_apply(query, summary, k_cache, v_cache, k, page_size, mode_s, num_pages,
                          seq_lens, sink_pages, recent_pages, reduce_s, scale, summary_scales);
  if (!env_opt_in("MEMOPS_CUDA_FUSED_STEP") || summary_scales.has_value()) return unfused();
  const bool sixteen_bit = query.scalar_type() != at::kFloat;
  const bool vectorized = allows_vector(query) && allows_vector(summary) &&
                          allows_vector(k_cache) && allows_vector(v_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  if (!sixteen_bit || !vectorized || !tensor_cores_available()) return unfused();
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  const int64_t Hq = query.size(1), D = query.size(2);
  if (value_checks_now()) {
    check_num_pages_values("topk_sparse_apply", num_pages, N);
    check_seq_lens_values("topk_sparse_apply", seq_lens, k_cache.size(2));
  }
  at::Tensor out = at::empty({B, Hq, D}, query.options());
  at::Tensor lse = at::empty({B, Hq}, query.options().dtype(at::kFloat));
  at::Tensor top_scores = at::empty({B, Hkv, k}, query.options().dtype(at::kFloat));
  at::Tensor top_indices = at::empty({B, Hkv, k}, query.options().dtype(at::kInt));
  at::Tensor scores = at::empty({B, Hkv, N}, query.options().dtype(at::kFloat));
  at::Tensor pages_holder, lens_holder;
  TopkApplyParams p{};
  p.relevancy = relevancy_params(query, summary, scores, mode_s, reduce_s, at::Tensor(),
                                 optional_int_data(num_pages, pages_holder));
  p.select = select_params(scores, p.relevancy.num_pages, top_scores, top_indices, k, sink_pages,
                           recent_pages);
  p.apply = sparse_apply_params(query, k_cache, v_cache, top_indices.const_data_ptr<int32_t>(), Hkv,
                                k, optional_int_data(seq_lens, lens_holder), out, lse, page_size,
                                scale);
  if (!topk_sparse_apply_tc_supported(p, vectorized, sixteen_bit)) return unfused();
  if (B * Hq == 0) return {out, lse, top_scores, top_indices};
  const int resident_blocks = grid_limit(2);
  plan_topk_sparse_apply_tc(p, resident_blocks);
  p.apply.separate_merge = false;
  const int64_t rows = B * Hkv;
  at::Tensor counters = at::zeros({1 + 3 * rows}, query.options().dtype(at::kInt));
  p.counters = counters.mutable_data_ptr<int32_t>();
  p.apply.split_done = p.counters + 1 + 2 * rows;
  at::Tensor partials;
  if (p.apply.splits > 1) partials = attach_split_partials(p.apply, query);
  check_launch(cuda::launch_topk_sparse_apply_tc(p, element_type(query), resident_blocks,
                                                 current_stream()),
               "topk_sparse_apply");
  return {out, lse, top_scores, top_indices};
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) { m.impl("topk_sparse_apply", &topk_sparse_apply_cuda); }

}  // namespace memops
