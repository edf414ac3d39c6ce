// Prepare Memory: the summary of one page of keys.
#pragma once

#include "memops/common.h"

namespace memops {

// Element-wise min and max over `n` tokens (`n` may be 0: zeros). `tokens` points at the first
// token of the page; consecutive tokens are `token_stride` elements apart; the head dim is dense.
template <typename T>
MEMOPS_HD void page_minmax(const T* tokens, int64_t token_stride, int64_t n, int64_t dim,
                           T* out_min, T* out_max) {
  for (int64_t d = 0; d < dim; ++d) {
    float lo = 0.f, hi = 0.f;
    if (n > 0) lo = hi = to_float(tokens[d]);
    for (int64_t t = 1; t < n; ++t) {
      const float v = to_float(tokens[t * token_stride + d]);
      lo = fmin32(v, lo);  // a NaN key of any token stays, as in torch.amin / amax
      hi = fmax32(v, hi);
    }
    // min and max of representable values are representable: the round trip is exact.
    out_min[d] = from_float<T>(lo);
    out_max[d] = from_float<T>(hi);
  }
}

// Mean over `n` tokens with float32 accumulation, in token order (zeros when n == 0).
template <typename T>
MEMOPS_HD void page_mean(const T* tokens, int64_t token_stride, int64_t n, int64_t dim, T* out) {
  for (int64_t d = 0; d < dim; ++d) {
    float acc = 0.f;
    for (int64_t t = 0; t < n; ++t) acc += to_float(tokens[t * token_stride + d]);
    out[d] = from_float<T>(n > 0 ? acc / static_cast<float>(n) : 0.f);
  }
}

}  // namespace memops
