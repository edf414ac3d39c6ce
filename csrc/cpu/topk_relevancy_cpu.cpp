#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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

constexpr int64_t kPageBlock = 8;

// Scores of up to kPageBlock consecutive pages of one (b, kv) row. The arithmetic of relevancy.h
// (score_bound / score_dot / score_indexer: every score sums over d in order, heads combine in
// order), so scores stay bit-identical to the HLS kernel's; but the pages are the innermost loop:
// `block` holds them transposed ([R][D][kPageBlock] floats), so the inner loop runs kPageBlock
// independent accumulators over contiguous memory, which vectorises, instead of one dependent
// chain of D additions per score.
struct ScoreBlock {
  const float* query;  // [G][D] floats of the row's query heads
  const float* weights;  // [G] indexer head weights, or nullptr
  int64_t heads, reps, dim;
};

static_assert(kPageBlock == 8, "a page block is one f32x8");

inline f32x8 max_nan(f32x8 a, f32x8 b) { return ((a > b) | (a != a)) ? a : b; }  // fmax32
inline f32x8 relu(f32x8 a) { return ((a > 0.f) | (a != a)) ? a : f32x8{}; }  // relu32

MEMOPS_CPU_MULTIVERSION
void score_block(const ScoreBlock& sb, const float* block, const RelevancyArgs& args, float* out) {
  const int64_t D = sb.dim;
  f32x8 score = {}, best = {};
  for (int64_t g = 0; g < sb.heads; ++g) {
    const float* q = sb.query + g * D;
    if (args.mode == RelevancyMode::kBound) {
      f32x8 acc = {};
      for (int64_t d = 0; d < D; ++d) {
        const f32x8 qd = f32x8{} + q[d];
        acc += max_nan(qd * load8(block + d * kPageBlock), qd * load8(block + (D + d) * kPageBlock));
      }
      best = acc;
    } else {
      for (int64_t r = 0; r < sb.reps; ++r) {
        f32x8 acc = {};
        for (int64_t d = 0; d < D; ++d)
          acc += (f32x8{} + q[d]) * load8(block + (r * D + d) * kPageBlock);
        best = r == 0 ? acc : max_nan(best, acc);
      }
    }
    if (args.mode == RelevancyMode::kIndexer)  // score_indexer: 0 + w0 relu(s0) + w1 relu(s1)...
      score = (g == 0 ? f32x8{} : score) + sb.weights[g] * relu(best);
    else if (g == 0)
      score = best;
    else if (args.reduce == GroupReduce::kMax)  // group_combine
      score = max_nan(score, best);
    else
      score += best;
  }
  std::memcpy(out, &score, sizeof(score));
}

// scores[b, kv, n] for every page: float32, one pass over the summary. An int8 summary (S =
// int8_t, `scales` its float32 [B, Hkv, N] page scales) is scored on its codes, which convert to
// float exactly, and each page's group score is then multiplied by its scale (quantize.h).
template <typename T, typename S = T>
void score_pages(const at::Tensor& query, const at::Tensor& summary, const float* weights,
                 const RelevancyArgs& args, at::Tensor& scores,
                 const at::Tensor* scales = nullptr) {
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  const int64_t R = summary.size(3), D = summary.size(4), Hq = query.size(1);
  const int64_t G = Hq / Hkv, blocks = ceil_div(N, kPageBlock);
  const T* qp = query.const_data_ptr<T>();
  const S* sp = summary.const_data_ptr<S>();
  const auto qs = query.strides();
  const auto ss = summary.strides();
  const float* cp = scales != nullptr ? scales->const_data_ptr<float>() : nullptr;
  const std::array<int64_t, 3> cs =
      scales != nullptr ? std::array<int64_t, 3>{scales->stride(0), scales->stride(1),
                                                 scales->stride(2)}
                        : std::array<int64_t, 3>{0, 0, 0};
  float* out = scores.mutable_data_ptr<float>();
  const int64_t grain = grain_for(kPageBlock * (R + G) * D);
  at::parallel_for(0, B * Hkv * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G * D), w(G), block(R * D * kPageBlock);
    float block_scores[kPageBlock];
    int64_t row = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (Hkv * blocks), kv = (i / blocks) % Hkv;
      const int64_t n0 = (i % blocks) * kPageBlock, count = min64(kPageBlock, N - n0);
      if (b * Hkv + kv != row) {  // the query heads of a new row, as floats
        row = b * Hkv + kv;
        for (int64_t g = 0; g < G; ++g) {
          const T* qg = qp + b * qs[0] + (kv * G + g) * qs[1];
          for (int64_t d = 0; d < D; ++d) q[g * D + d] = to_float(qg[d]);
          if (weights != nullptr) w[g] = weights[b * Hq + kv * G + g];
        }
      }
      const S* pages = sp + b * ss[0] + kv * ss[1] + n0 * ss[2];
      if (count < kPageBlock) std::fill(block.begin(), block.end(), 0.f);  // never stored
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t r = 0; r < R; ++r) {
          const S* src = pages + j * ss[2] + r * ss[3];
          float* dst = block.data() + r * D * kPageBlock + j;
          for (int64_t d = 0; d < D; ++d) dst[d * kPageBlock] = to_float(src[d]);
        }
      }
      score_block(ScoreBlock{q.data(), weights != nullptr ? w.data() : nullptr, G, R, D},
                  block.data(), args, block_scores);
      float* row_out = out + (b * Hkv + kv) * N + n0;
      if (cp == nullptr) {
        for (int64_t j = 0; j < count; ++j) row_out[j] = block_scores[j];
      } else {
        const float* page_scales = cp + b * cs[0] + kv * cs[1] + n0 * cs[2];
        for (int64_t j = 0; j < count; ++j) row_out[j] = page_scales[j * cs[2]] * block_scores[j];
      }
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
    c10::string_view group_reduce, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& summary_scales) {
  const std::string mode_s(mode), reduce_s(group_reduce);
  check_topk_relevancy(query, summary, k, mode_s, num_pages, sink_pages, recent_pages, reduce_s,
                       weights, summary_scales);
  check_num_pages_values("topk_relevancy", num_pages, summary.size(2));
  const RelevancyArgs args{parse_relevancy_mode("topk_relevancy", mode_s),
                           parse_group_reduce("topk_relevancy", reduce_s), k, sink_pages,
                           recent_pages};
  const int64_t B = summary.size(0), Hkv = summary.size(1), N = summary.size(2);
  at::Tensor scores = at::empty({B, Hkv, N}, query.options().dtype(at::kFloat));
  at::Tensor w;
  if (weights.has_value()) w = weights->to(at::kFloat).contiguous();
  MEMOPS_DISPATCH_FLOAT(query.scalar_type(), "topk_relevancy_cpu", [&] {
    if (summary.scalar_type() == at::kChar)
      score_pages<scalar_t, int8_t>(query, summary, nullptr, args, scores, &*summary_scales);
    else
      score_pages<scalar_t>(query, summary, w.defined() ? w.const_data_ptr<float>() : nullptr,
                            args, scores);
  });
  at::Tensor top_scores = at::empty({B, Hkv, k}, query.options().dtype(at::kFloat));
  at::Tensor top_indices = at::empty({B, Hkv, k}, query.options().dtype(at::kInt));
  at::Tensor pages_holder;
  select_rows(scores, optional_int_ptr(num_pages, pages_holder), args, top_scores, top_indices);
  return {top_scores, top_indices};
}

TORCH_LIBRARY_IMPL(memops, CPU, m) { m.impl("topk_relevancy", &topk_relevancy_cpu); }

}  // namespace memops
