// Retrieval on the FPGA: load (read each selected page's valid tokens as bursts of words) ->
// store (write every slot of P tokens, zero-filling what is not valid, and the row lengths).
// Data moves as whole words, so the copy is bit-exact for every dtype.
#include "gather_retrieve.h"

#include "memops/common.h"

namespace memops_hls {
namespace {

void load_slots(const word_t* memory, const int32_t* indices, const int32_t* seq_lens,
                int64_t memory_offset, int64_t indices_offset, int64_t seq_lens_offset,
                int64_t batch, int64_t heads, int64_t row_words, int64_t k, int64_t page_size,
                int64_t mem_stride_b, int64_t mem_stride_h, int64_t mem_stride_s,
                int64_t idx_stride_b, int64_t idx_stride_h, int64_t idx_stride_k,
                hls::stream<int64_t>& slot_tokens, hls::stream<word_t>& words) {
load_row:
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = seq_lens[seq_lens_offset + b];
  load_head:
    for (int64_t h = 0; h < heads; ++h) {
    load_slot:
      for (int64_t j = 0; j < k; ++j) {
        const int32_t page =
            indices[indices_offset + b * idx_stride_b + h * idx_stride_h + j * idx_stride_k];
        const int64_t n = page < 0 ? 0 : memops::page_valid_tokens(page, page_size, length);
        slot_tokens.write(n);
        const int64_t base =
            memory_offset + b * mem_stride_b + h * mem_stride_h + page * page_size * mem_stride_s;
      load_tokens:
        for (int64_t t = 0; t < n; ++t) {
        load_words:
          for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
            words.write(memory[base + t * mem_stride_s + w]);
          }
        }
      }
    }
  }
}

void store_slots(word_t* out, int32_t* lengths, int64_t out_offset, int64_t lengths_offset,
                 int64_t rows, int64_t row_words, int64_t k, int64_t page_size,
                 hls::stream<int64_t>& slot_tokens, hls::stream<word_t>& words) {
  const word_t zero = zero_word();
store_row:
  for (int64_t r = 0; r < rows; ++r) {
    int64_t copied = 0;
    const int64_t row_base = out_offset + r * k * page_size * row_words;
  store_slot:
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = slot_tokens.read();
      copied += n;
    store_words:
      for (int64_t i = 0; i < page_size * row_words; ++i) {
#pragma HLS PIPELINE II = 1
        out[row_base + j * page_size * row_words + i] = i < n * row_words ? words.read() : zero;
      }
    }
    lengths[lengths_offset + r] = static_cast<int32_t>(copied);
  }
}

}  // namespace
}  // namespace memops_hls

extern "C" void memops_gather_retrieve(
    const memops_hls::word_t* memory, const int32_t* indices, const int32_t* seq_lens,
    memops_hls::word_t* out, int32_t* lengths, int64_t memory_offset, int64_t indices_offset,
    int64_t seq_lens_offset, int64_t out_offset, int64_t lengths_offset, int64_t batch,
    int64_t heads, int64_t row_words, int64_t k, int64_t page_size, int64_t mem_stride_b,
    int64_t mem_stride_h, int64_t mem_stride_s, int64_t idx_stride_b, int64_t idx_stride_h,
    int64_t idx_stride_k) {
#pragma HLS INTERFACE m_axi port = memory offset = slave bundle = gmem_memory max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = indices offset = slave bundle = gmem_control
#pragma HLS INTERFACE m_axi port = seq_lens offset = slave bundle = gmem_control
#pragma HLS INTERFACE m_axi port = out offset = slave bundle = gmem_out max_write_burst_length = 64
#pragma HLS INTERFACE m_axi port = lengths offset = slave bundle = gmem_lengths
#pragma HLS INTERFACE s_axilite port = return
  using namespace memops_hls;
  if (batch * heads == 0) return;
  hls::stream<int64_t> slot_tokens;
  hls::stream<word_t> words;
#pragma HLS STREAM variable = slot_tokens depth = kStreamDepth
#pragma HLS STREAM variable = words depth = kStreamDepth
#pragma HLS DATAFLOW
  load_slots(memory, indices, seq_lens, memory_offset, indices_offset, seq_lens_offset, batch,
             heads, row_words, k, page_size, mem_stride_b, mem_stride_h, mem_stride_s,
             idx_stride_b, idx_stride_h, idx_stride_k, slot_tokens, words);
  store_slots(out, lengths, out_offset, lengths_offset, batch * heads, row_words, k, page_size,
              slot_tokens, words);
}
