// Compute Relevancy + top-k kernel: score every page of a kv head's summary against the query
// heads of its GQA group (bound, dot or indexer), reduce the group, select the exact top-k with
// forced sink/recent pages, and write (scores, indices) in ascending page order.
#pragma once

#include "memops_hls.h"

// query [B, Hq, D] and summary [B, Hkv, N, R, D] are addressed in 512-bit words (offsets and
// strides in words, row_words = D * elem / 64). num_pages int32 [B], weights float32 [B, Hq]
// (indexer only) and the outputs scores float32 / indices int32 [B, Hkv, k] are contiguous and
// addressed in elements. An int8 summary (summary_dtype kInt8, mode bound): codes
// [B, Hkv, N, 2, D] in words of 64 codes (D / 64 words a row) and float32 page scales
// [B, Hkv, N] (element offset and strides); the score is scale * the bound of the codes, as the
// CPU computes it. Otherwise summary_dtype == dtype and `scales` is not read.
extern "C" void memops_topk_relevancy(
    const memops_hls::word_t* query, const memops_hls::word_t* summary, const int32_t* num_pages,
    const float* weights, float* out_scores, int32_t* out_indices, int64_t query_offset,
    int64_t summary_offset, int64_t num_pages_offset, int64_t weights_offset,
    int64_t scores_offset, int64_t indices_offset, int64_t batch, int64_t q_heads,
    int64_t kv_heads, int64_t reps, int64_t row_words, int64_t k, int64_t sink_pages,
    int64_t recent_pages, int64_t q_stride_b, int64_t q_stride_h, int64_t sum_stride_b,
    int64_t sum_stride_h, int64_t sum_stride_n, int64_t sum_stride_r, int64_t mode,
    int64_t group_reduce, int64_t dtype, const float* scales, int64_t scales_offset,
    int64_t scale_stride_b, int64_t scale_stride_h, int64_t scale_stride_n,
    int64_t summary_dtype);
