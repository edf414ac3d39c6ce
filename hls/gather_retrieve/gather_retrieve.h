// Retrieval kernel: copy the selected pages of memory [B, H, S, D] back to back into
// out [B, H, k*P, D] (slot j at rows j*P .. j*P+P-1, invalid tokens and padding slots zero) and
// count the valid tokens of each row.
#pragma once

#include "memops_hls.h"

// memory and out are addressed in 512-bit words (offsets and strides in words, row_words =
// D * elem / 64; out is contiguous). indices int32 [B, H, k] (element strides), seq_lens int32
// [B] and lengths int32 [B, H] (contiguous) are addressed in elements.
extern "C" void memops_gather_retrieve(
    const memops_hls::word_t* memory, const int32_t* indices, const int32_t* seq_lens,
    memops_hls::word_t* out, int32_t* lengths, int64_t memory_offset, int64_t indices_offset,
    int64_t seq_lens_offset, int64_t out_offset, int64_t lengths_offset, int64_t batch,
    int64_t heads, int64_t row_words, int64_t k, int64_t page_size, int64_t mem_stride_b,
    int64_t mem_stride_h, int64_t mem_stride_s, int64_t idx_stride_b, int64_t idx_stride_h,
    int64_t idx_stride_k);
