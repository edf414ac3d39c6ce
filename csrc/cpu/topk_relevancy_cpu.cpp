#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "memops/relevancy.h"
#include "memops/topk.h"
#include "validate.h"

namespace memops {
namespace {

struct RelevancyArgs {
  RelevancyMode mode;
  GroupReduce reduce;
  int64_t k, sink_pages, recent_pages;
};

// scores[b, kv, n] for every page: float32, one pass over the summary.
template <typename T>
void score_pages(const at::Tensor& query, const at::Tensor& summary, const float* weights,
                 const RelevancyArgs& args, at::Tensor& scores) {
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  const int64_t R = summary.size(3), D = summary.size(4), Hq = query.size(1);
  const int64_t G = Hq / Hkv;
  const T* qp = query.const_data_ptr<T>();
  const T* sp = summary.const_data_ptr<T>();
  const auto qs = query.strides();
  const auto ss = summary.strides();
  float* out = scores.mutable_data_ptr<float>();
  at::parallel_for(0, B * Hkv * N, grain_for(G * R * D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hkv * N), kv = (i / N) % Hkv, n = i % N;
      const T* page = sp + b * ss[0] + kv * ss[1] + n * ss[2];
      const T* q0 = qp + b * qs[0] + kv * G * qs[1];
      float score = 0.f;
      if (args.mode == RelevancyMode::kIndexer) {
        score = score_indexer(q0, qs[1], G, weights + b * Hq, page, D);
      } else {
        for (int64_t g = 0; g < G; ++g) {
          const T* q = q0 + g * qs[1];
          const float s = args.mode == RelevancyMode::kBound
                              ? score_bound(q, page, page + ss[3], D)
                              : score_dot(q, page, ss[3], R, D);
          score = group_combine(score, s, g == 0, args.reduce);
        }
      }
      out[i] = score;
    }
  });
}

// Exact top-k of each row of `scores` under DESIGN.md's rules, indices ascending.
void select_rows(const at::Tensor& scores, const int32_t* num_pages, const RelevancyArgs& args,
                 at::Tensor& top_scores, at::Tensor& top_indices) {
  const int64_t rows = scores.size(0) * scores.size(1), Hkv = scores.size(1), N = scores.size(2);
  const int64_t k = args.k;
  const float* sp = scores.const_data_ptr<float>();
  float* out_s = top_scores.mutable_data_ptr<float>();
  int32_t* out_i = top_indices.mutable_data_ptr<int32_t>();
  at::parallel_for(0, rows, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> chosen, candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = sp + r * N;
      const int64_t nv = num_pages == nullptr ? N : num_pages[r / Hkv];
      chosen.clear();
      candidates.clear();
      for (int64_t p = 0; p < nv; ++p) {
        if (is_forced_page(p, nv, args.sink_pages, args.recent_pages))
          chosen.push_back(static_cast<int32_t>(p));
        else
          candidates.push_back(static_cast<int32_t>(p));
      }
      const auto before = [row](int32_t a, int32_t b) { return ranks_before(row[a], a, row[b], b); };
      const int64_t budget =
          std::min<int64_t>(k - static_cast<int64_t>(chosen.size()), candidates.size());
      if (budget > 0) {
        std::nth_element(candidates.begin(), candidates.begin() + (budget - 1), candidates.end(),
                         before);
        chosen.insert(chosen.end(), candidates.begin(), candidates.begin() + budget);
      }
      std::sort(chosen.begin(), chosen.end());
      for (int64_t j = 0; j < k; ++j) {
        const bool valid = j < static_cast<int64_t>(chosen.size());
        out_i[r * k + j] = valid ? chosen[j] : -1;
        out_s[r * k + j] = valid ? row[chosen[j]] : -INFINITY;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_relevancy_cpu(
    const at::Tensor& query, const at::Tensor& summary, int64_t k, c10::string_view mode,
    const std::optional<at::Tensor>& num_pages, int64_t sink_pages, int64_t recent_pages,
    c10::string_view group_reduce, const std::optional<at::Tensor>& weights) {
  const std::string mode_s(mode), reduce_s(group_reduce);
  check_topk_relevancy(query, summary, k, mode_s, num_pages, sink_pages, recent_pages, reduce_s,
                       weights);
  check_num_pages_values("topk_relevancy", num_pages, summary.size(2));
  const RelevancyArgs args{parse_relevancy_mode("topk_relevancy", mode_s),
                           parse_group_reduce("topk_relevancy", reduce_s), k, sink_pages,
                           recent_pages};
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  at::Tensor scores = at::empty({B, Hkv, N}, query.options().dtype(at::kFloat));
  at::Tensor w;
  if (weights.has_value()) w = weights->to(at::kFloat).contiguous();
  MEMOPS_DISPATCH_FLOAT(query.scalar_type(), "topk_relevancy_cpu", [&] {
    score_pages<scalar_t>(query, summary, w.defined() ? w.const_data_ptr<float>() : nullptr, args,
                          scores);
  });
  at::Tensor top_scores = at::empty({B, Hkv, k}, query.options().dtype(at::kFloat));
  at::Tensor top_indices = at::empty({B, Hkv, k}, query.options().dtype(at::kInt));
  at::Tensor pages_holder;
  select_rows(scores, optional_int_ptr(num_pages, pages_holder), args, top_scores, top_indices);
  return {top_scores, top_indices};
}

TORCH_LIBRARY_IMPL(memops, CPU, m) { m.impl("topk_relevancy", &topk_relevancy_cpu); }

}  // namespace memops
