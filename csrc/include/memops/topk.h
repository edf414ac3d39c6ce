// Retrieval: the selection rule of topk_relevancy, shared by the host backends.
// Ordering: higher score first, ties to the lower page index, NaN ranked as -inf.
#pragma once

#include <cmath>

#include "memops/common.h"

namespace memops {

MEMOPS_HD float rank_key(float score) { return score != score ? -INFINITY : score; }

// True when page a (score sa) ranks before page b (score sb).
MEMOPS_HD bool ranks_before(float sa, int32_t a, float sb, int32_t b) {
  const float ka = rank_key(sa), kb = rank_key(sb);
  return ka > kb || (ka == kb && a < b);
}

// Whether page p of a row with `num_valid` pages is always selected (sink or recent window).
MEMOPS_HD bool is_forced_page(int64_t p, int64_t num_valid, int64_t sink_pages,
                              int64_t recent_pages) {
  return p < sink_pages || p >= num_valid - recent_pages;
}

// The pages that compete for the budget are [candidate_begin, candidate_end): the valid pages
// that are not forced.
MEMOPS_HD int64_t candidate_begin(int64_t num_valid, int64_t sink_pages) {
  return min64(sink_pages, num_valid);
}
MEMOPS_HD int64_t candidate_end(int64_t num_valid, int64_t sink_pages, int64_t recent_pages) {
  return max64(candidate_begin(num_valid, sink_pages), num_valid - min64(recent_pages, num_valid));
}

// Number of forced pages of a row.
MEMOPS_HD int64_t num_forced_pages(int64_t num_valid, int64_t sink_pages, int64_t recent_pages) {
  return num_valid - (candidate_end(num_valid, sink_pages, recent_pages) -
                      candidate_begin(num_valid, sink_pages));
}

}  // namespace memops
