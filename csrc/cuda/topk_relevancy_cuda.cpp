#include <torch/library.h>

#include "cuda/cuda_common.h"
#include "cuda/op_params.h"
#include "validate.h"

namespace memops {
namespace {

// Per-row done counters for a scoring kernel that selects each row in its last block: for rows
// of up to kFusedSelectDefaultMaxPages pages unless MEMOPS_CUDA_FUSED_SELECT=0, zeroed here (a
// memset, so the op stays graph-capturable). Undefined when the selection runs as a kernel of
// its own.
at::Tensor fused_select_counters(int64_t pages, int64_t rows, const at::Tensor& like) {
  if (pages > kFusedSelectDefaultMaxPages || !env_switch("MEMOPS_CUDA_FUSED_SELECT")) return {};
  return at::zeros({rows}, like.options().dtype(at::kInt));
}

// An int8 summary: codes + page scales, scored on tensor cores for 16-bit queries where
// int8_tc_supported (int8_summary_tc.cuh), else by the portable kernel (int8_summary.cuh); the
// selection as for the 16-bit summaries.
void topk_relevancy_int8_cuda(const at::Tensor& query, const at::Tensor& codes,
                              const at::Tensor& scales, int64_t k,
                              const std::optional<at::Tensor>& num_pages, int64_t sink_pages,
                              int64_t recent_pages, const std::string& group_reduce,
                              at::Tensor& scores, at::Tensor& top_scores,
                              at::Tensor& top_indices) {
  at::Tensor pages_holder;
  RelevancyInt8Params ip{};
  ip.query = query.const_data_ptr();
  ip.codes = codes.const_data_ptr<int8_t>();
  ip.scales = scales.const_data_ptr<float>();
  ip.num_pages = optional_int_data(num_pages, pages_holder);
  ip.scores = scores.mutable_data_ptr<float>();
  ip.batch = codes.size(0);
  ip.q_heads = query.size(1);
  ip.kv_heads = codes.size(1);
  ip.pages = codes.size(2);
  ip.dim = codes.size(4);
  for (int i = 0; i < 2; ++i) ip.query_stride[i] = query.stride(i);
  for (int i = 0; i < 4; ++i) ip.code_stride[i] = codes.stride(i);
  for (int i = 0; i < 3; ++i) ip.scale_stride[i] = scales.stride(i);
  ip.reduce = parse_group_reduce("topk_relevancy", group_reduce);
  SelectParams sp = select_params(scores, ip.num_pages, top_scores, top_indices, k, sink_pages,
                                  recent_pages);
  // As the 16-bit summaries: rows short enough are selected by the scoring kernel.
  at::Tensor done = fused_select_counters(ip.pages, ip.batch * ip.kv_heads, query);
  int* done_ptr = done.defined() ? done.mutable_data_ptr<int32_t>() : nullptr;
  const bool vectorized = allows_vector(codes);
  if (tensor_cores_available() &&
      int8_tc_supported(ip, vectorized && allows_vector(query), query.scalar_type() != at::kFloat)) {
    check_launch(cuda::launch_topk_relevancy_int8_tc(ip, sp, element_type(query), done_ptr,
                                                     grid_limit(2), current_stream()),
                 "topk_relevancy");
  } else {
    check_launch(cuda::launch_topk_relevancy_int8(ip, sp, element_type(query), vectorized,
                                                  done_ptr, grid_limit(8), current_stream()),
                 "topk_relevancy");
  }
}

}  // namespace

RelevancyParams relevancy_params(const at::Tensor& query, const at::Tensor& summary,
                                 at::Tensor& scores, const std::string& mode,
                                 const std::string& group_reduce, const at::Tensor& weights,
                                 const int32_t* num_pages) {
  RelevancyParams rp{};
  rp.query = query.const_data_ptr();
  rp.summary = summary.const_data_ptr();
  rp.weights = weights.defined() ? weights.const_data_ptr<float>() : nullptr;
  rp.num_pages = num_pages;
  rp.scores = scores.mutable_data_ptr<float>();
  rp.batch = summary.size(0);
  rp.q_heads = query.size(1);
  rp.kv_heads = summary.size(1);
  rp.pages = summary.size(2);
  rp.reps = summary.size(3);
  rp.dim = summary.size(4);
  for (int i = 0; i < 2; ++i) rp.query_stride[i] = query.stride(i);
  for (int i = 0; i < 4; ++i) rp.summary_stride[i] = summary.stride(i);
  rp.mode = parse_relevancy_mode("topk_relevancy", mode);
  rp.reduce = parse_group_reduce("topk_relevancy", group_reduce);
  return rp;
}

SelectParams select_params(const at::Tensor& scores, const int32_t* num_pages,
                           at::Tensor& top_scores, at::Tensor& top_indices, int64_t k,
                           int64_t sink_pages, int64_t recent_pages) {
  SelectParams sp{};
  sp.scores = scores.const_data_ptr<float>();
  sp.num_pages = num_pages;
  sp.top_scores = top_scores.mutable_data_ptr<float>();
  sp.top_indices = top_indices.mutable_data_ptr<int32_t>();
  sp.heads = scores.size(1);
  sp.pages = scores.size(2);
  sp.k = k;
  sp.sink_pages = sink_pages;
  sp.recent_pages = recent_pages;
  sp.value_errors = value_error_word_ptr();
  return sp;
}

std::tuple<at::Tensor, at::Tensor> topk_relevancy_cuda(
    const at::Tensor& query, const at::Tensor& summary, int64_t k, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, int64_t sink_pages, int64_t recent_pages,
    c10::string_view group_reduce, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& summary_scales) {
  const std::string mode_s(mode), reduce_s(group_reduce);
  check_topk_relevancy(query, summary, k, mode_s, num_pages, sink_pages, recent_pages, reduce_s,
                       weights, summary_scales);
  TORCH_CHECK(summary.size(4) <= kGpuMaxDim, "memops.topk_relevancy: the CUDA "
              "kernel supports head dims D <= ", kGpuMaxDim, ", got ",
              summary.size(4), "; run this step on the CPU");
  TORCH_CHECK(summary.size(2) <= INT32_MAX, "memops.topk_relevancy: at most 2^31 - 1 pages, got ",
              summary.size(2));
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  if (value_checks_now()) check_num_pages_values("topk_relevancy", num_pages, N);
  TORCH_CHECK(B * Hkv <= 65535, "memops.topk_relevancy: the CUDA kernel supports B * Hkv <= "
              "65535 rows, got ", B * Hkv);
  at::Tensor top_scores = at::empty({B, Hkv, k}, query.options().dtype(at::kFloat));
  at::Tensor top_indices = at::empty({B, Hkv, k}, query.options().dtype(at::kInt));
  if (B * Hkv == 0) return {top_scores, top_indices};
  // Scores of every page, float32 (N * 4 bytes a row, small next to the summary it is read from).
  at::Tensor scores = at::empty({B, Hkv, N}, query.options().dtype(at::kFloat));
  at::Tensor w, pages_holder;
  if (weights.has_value()) w = weights->to(at::kFloat).contiguous();
  if (summary.scalar_type() == at::kChar) {
    topk_relevancy_int8_cuda(query, summary, *summary_scales, k, num_pages, sink_pages,
                             recent_pages, reduce_s, scores, top_scores, top_indices);
    return {top_scores, top_indices};
  }

  RelevancyParams rp = relevancy_params(query, summary, scores, mode_s, reduce_s, w,
                                        optional_int_data(num_pages, pages_holder));
  SelectParams sp = select_params(scores, rp.num_pages, top_scores, top_indices, k, sink_pages,
                                  recent_pages);
  const bool vectorized = allows_vector(summary) && allows_vector(query);
  if (tensor_cores_available() &&
      relevancy_tc_supported(rp, vectorized, query.scalar_type() != at::kFloat)) {
    // Rows short enough are selected by the scoring kernel's last block of each row.
    at::Tensor done = fused_select_counters(N, B * Hkv, query);
    check_launch(cuda::launch_topk_relevancy_tc(
                     rp, sp, element_type(query),
                     done.defined() ? done.mutable_data_ptr<int32_t>() : nullptr, grid_limit(2),
                     current_stream()),
                 "topk_relevancy");
  } else {
    check_launch(cuda::launch_topk_relevancy(rp, sp, element_type(query), allows_vector(summary),
                                             grid_limit(8), current_stream()),
                 "topk_relevancy");
  }
  return {top_scores, top_indices};
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) { m.impl("topk_relevancy", &topk_relevancy_cuda); }

}  // namespace memops
