// Apply to Inference: online-softmax state for decode attention, and the exact merge of two
// partial results. lse is the natural-log log-sum-exp of the scaled logits.
#pragma once

#include <cmath>

#include "memops/common.h"

namespace memops {

// Running maximum `m` and sum `l` of exp(logit - m); the output accumulator lives with the caller.
struct SoftmaxState {
  float m = -INFINITY;
  float l = 0.f;
};

// Adds one logit: returns the factor by which the caller must rescale its accumulator before
// adding `p * v`, and sets `p` to the new token's weight.
MEMOPS_HD float softmax_push(SoftmaxState& s, float logit, float& p) {
  const float m_new = fmax32(s.m, logit);
  const float rescale = s.m == -INFINITY ? 0.f : expf(s.m - m_new);
  p = expf(logit - m_new);
  s.l = s.l * rescale + p;
  s.m = m_new;
  return rescale;
}

MEMOPS_HD float softmax_lse(const SoftmaxState& s) {
  return s.l > 0.f ? s.m + logf(s.l) : -INFINITY;
}

// Weights of the two parts in the merged output, and the merged lse (docs/design.md,
// "merge_attention and non-finite lse"): a NaN lse makes the row NaN; two empty parts (-inf)
// give weights 0 and lse -inf; a part with lse +inf takes all the weight (the limit of
// exp(lse_a) / (exp(lse_a) + exp(lse_b))), two such parts share it equally, and lse is +inf.
MEMOPS_HD void merge_weights(float lse_a, float lse_b, float& w_a, float& w_b, float& lse) {
  const float m = fmax32(lse_a, lse_b);
  if ((lse_a != lse_a) | (lse_b != lse_b)) {
    w_a = w_b = lse = NAN;
    return;
  }
  if (m == -INFINITY) {
    w_a = w_b = 0.f;
    lse = -INFINITY;
    return;
  }
  if (m == INFINITY) {
    const bool inf_a = lse_a == INFINITY, inf_b = lse_b == INFINITY;
    w_a = inf_a ? (inf_b ? 0.5f : 1.f) : 0.f;
    w_b = inf_b ? (inf_a ? 0.5f : 1.f) : 0.f;
    lse = INFINITY;
    return;
  }
  const float ea = expf(lse_a - m), eb = expf(lse_b - m);
  const float sum = ea + eb;
  w_a = ea / sum;
  w_b = eb / sum;
  lse = m + logf(sum);
}

}  // namespace memops
