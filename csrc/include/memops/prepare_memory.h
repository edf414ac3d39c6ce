// Prepare Memory: the summary of one page of keys.
#pragma once

#include "memops/common.h"

namespace memops {

// The summary of one page of `n` tokens (`n` may be 0: zeros). `tokens` points at the first token
// of the page; consecutive tokens are `token_stride` elements apart; the head dim is dense.
// kMinMax writes the element-wise min to `out_first` and the max to `out_second`; kMean writes the
// float32-accumulated mean to `out_first`. `lo`/`hi` are float scratch of `dim` elements.
//
// Tokens are the outer loop and the head dim the inner one, so the inner loop reads contiguous
// keys into independent accumulators (vectorised on the CPU); the HLS kernel runs the same
// expressions in the same order (bit-identical summaries). min/max are exact and every mean
// accumulates over tokens in order, starting from 0 as torch's sum does.
template <typename T>
MEMOPS_HD void summarise_page(const T* tokens, int64_t token_stride, int64_t n, int64_t dim,
                              SummaryMode mode, float* lo, float* hi, T* out_first,
                              T* out_second) {
  if (n == 0) {
    for (int64_t d = 0; d < dim; ++d) out_first[d] = from_float<T>(0.f);
    if (mode == SummaryMode::kMinMax)
      for (int64_t d = 0; d < dim; ++d) out_second[d] = from_float<T>(0.f);
    return;
  }
  if (mode == SummaryMode::kMinMax) {
    for (int64_t d = 0; d < dim; ++d) lo[d] = hi[d] = to_float(tokens[d]);
    for (int64_t t = 1; t < n; ++t) {
      const T* token = tokens + t * token_stride;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = to_float(token[d]);
        lo[d] = fmin32(v, lo[d]);  // a NaN key of any token stays, as in torch.amin / amax
        hi[d] = fmax32(v, hi[d]);
      }
    }
    // min and max of representable values are representable: the round trip is exact.
    for (int64_t d = 0; d < dim; ++d) out_first[d] = from_float<T>(lo[d]);
    for (int64_t d = 0; d < dim; ++d) out_second[d] = from_float<T>(hi[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) lo[d] = 0.f + to_float(tokens[d]);  // -0.0 sums to +0.0
    for (int64_t t = 1; t < n; ++t) {
      const T* token = tokens + t * token_stride;
      for (int64_t d = 0; d < dim; ++d) lo[d] += to_float(token[d]);
    }
    const float count = static_cast<float>(n);
    for (int64_t d = 0; d < dim; ++d) out_first[d] = from_float<T>(lo[d] / count);
  }
}

}  // namespace memops
