// Prepare Memory kernel: per-page min/max (R = 2) or mean (R = 1) of the keys, on HBM.
#pragma once

#include "memops_hls.h"

// keys [B, H, S, D] and summary [B, H, N, R, D] are addressed in 512-bit words: `*_offset` is
// the first word of the tensor, `*_stride_*` are word strides and `row_words` = D * elem / 64.
// seq_lens is int32 [B] (element offset). Pages first_page .. last_page - 1 are written.
// mode 2 (minmax_int8): `summary` gets int8 codes [B, H, N, 2, D] (D / 64 words a row, strides in
// words) and `scales` float32 [B, H, N] (element offset and strides) the page scales of
// csrc/include/memops/quantize.h; other modes do not touch `scales`.
extern "C" void memops_prepare_memory(
    const memops_hls::word_t* keys, memops_hls::word_t* summary, const int32_t* seq_lens,
    int64_t keys_offset, int64_t summary_offset, int64_t seq_lens_offset, int64_t batch,
    int64_t heads, int64_t row_words, int64_t page_size, int64_t first_page, int64_t last_page,
    int64_t key_stride_b, int64_t key_stride_h, int64_t key_stride_s, int64_t sum_stride_b,
    int64_t sum_stride_h, int64_t sum_stride_n, int64_t sum_stride_r, int64_t mode,
    int64_t dtype, float* scales, int64_t scales_offset, int64_t scale_stride_b,
    int64_t scale_stride_h, int64_t scale_stride_n);
