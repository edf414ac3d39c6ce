// Compute Relevancy: the score of one page for one query head, in float32.
// The summation runs over d in order, so that every backend that calls these functions
// (CPU, HLS C-simulation) produces bit-identical scores and therefore identical selections.
#pragma once

#include "memops/common.h"

namespace memops {

// Quest's upper bound of q.k over the page: sum_d max(q_d * min_d, q_d * max_d).
template <typename Q, typename S>
MEMOPS_HD float score_bound(const Q* q, const S* lo, const S* hi, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) {
    const float qd = to_float(q[d]);
    acc += fmax32(qd * to_float(lo[d]), qd * to_float(hi[d]));
  }
  return acc;
}

template <typename Q, typename S>
MEMOPS_HD float dot(const Q* q, const S* k, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += to_float(q[d]) * to_float(k[d]);
  return acc;
}

// max over the R representatives (rep_stride elements apart) of <q, rep_r>.
template <typename Q, typename S>
MEMOPS_HD float score_dot(const Q* q, const S* reps, int64_t rep_stride, int64_t num_reps,
                          int64_t dim) {
  float best = dot(q, reps, dim);
  for (int64_t r = 1; r < num_reps; ++r) best = fmax32(best, dot(q, reps + r * rep_stride, dim));
  return best;
}

// Folds the score of one more query head of a GQA group into the running group score.
MEMOPS_HD float group_combine(float running, float head_score, bool first, GroupReduce reduce) {
  if (first) return head_score;
  return reduce == GroupReduce::kMax ? fmax32(running, head_score) : running + head_score;
}

// DeepSeek's lightning indexer: sum_h w_h * relu(<q_h, key>), heads in order; a NaN logit
// propagates (relu32), as in torch.relu.
template <typename Q, typename S, typename W>
MEMOPS_HD float score_indexer(const Q* q, int64_t head_stride, int64_t num_heads, const W* w,
                              const S* key, int64_t dim) {
  float acc = 0.f;
  for (int64_t h = 0; h < num_heads; ++h) {
    const float logit = dot(q + h * head_stride, key, dim);
    acc += to_float(w[h]) * relu32(logit);
  }
  return acc;
}

}  // namespace memops
