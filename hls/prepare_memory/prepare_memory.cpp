// Prepare Memory on the FPGA: load (HBM -> stream of key words) -> summarise (one page at a time,
// float32, the CPU backend's arithmetic in the same order) -> store (stream -> HBM).
#include "prepare_memory.h"

#include "memops/common.h"
#include "memops/quantize.h"

namespace memops_hls {
namespace {

struct PageJob {
  int64_t tokens;  // valid tokens of the page (0 .. page_size)
};

void load_pages(const word_t* keys, const int32_t* seq_lens, int64_t keys_offset,
                int64_t seq_lens_offset, int64_t batch, int64_t heads, int64_t row_words,
                int64_t page_size, int64_t first_page, int64_t last_page, int64_t stride_b,
                int64_t stride_h, int64_t stride_s, hls::stream<PageJob>& jobs,
                hls::stream<word_t>& token_words) {
load_rows:
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = seq_lens[seq_lens_offset + b];
  load_heads:
    for (int64_t h = 0; h < heads; ++h) {
    load_page:
      for (int64_t p = first_page; p < last_page; ++p) {
        const int64_t n = memops::page_valid_tokens(p, page_size, length);
        jobs.write(PageJob{n});
        const int64_t base = keys_offset + b * stride_b + h * stride_h + p * page_size * stride_s;
      load_tokens:
        for (int64_t t = 0; t < n; ++t) {
        load_words:
          for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
            token_words.write(keys[base + t * stride_s + w]);
          }
        }
      }
    }
  }
}

// kMinMaxInt8 (mode 2): the min/max rows quantised by quantize_minmax_page (the CPU's codes and
// scale, bit for bit): 2 * D / 64 words of codes, then the scale on `page_scales`.
constexpr int64_t kModeMinMaxInt8 = 2;

void summarise_pages(int64_t num_pages, int64_t row_words, int64_t mode, int64_t dtype,
                     hls::stream<PageJob>& jobs, hls::stream<word_t>& token_words,
                     hls::stream<word_t>& summary_words, hls::stream<float>& page_scales) {
  const int lanes = lanes_per_word(static_cast<int>(dtype));
  float lo[kMaxHeadDim], hi[kMaxHeadDim], sum[kMaxHeadDim];
#pragma HLS ARRAY_PARTITION variable = lo cyclic factor = 32
#pragma HLS ARRAY_PARTITION variable = hi cyclic factor = 32
#pragma HLS ARRAY_PARTITION variable = sum cyclic factor = 32
summarise_page:
  for (int64_t i = 0; i < num_pages; ++i) {
    const int64_t n = jobs.read().tokens;
  reset:
    for (int d = 0; d < kMaxHeadDim; ++d) {
#pragma HLS UNROLL factor = 32
      lo[d] = 0.f;
      hi[d] = 0.f;
      sum[d] = 0.f;
    }
  accumulate_tokens:
    for (int64_t t = 0; t < n; ++t) {
    accumulate_words:
      for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
        const word_t word = token_words.read();
      accumulate_lanes:
        for (int l = 0; l < kMaxLanes; ++l) {
#pragma HLS UNROLL
          if (l >= lanes) continue;
          const int d = static_cast<int>(w) * lanes + l;
          const float v = lane_to_float(word, l, static_cast<int>(dtype));
          // The expressions of memops::summarise_page, so the bits match the CPU.
          lo[d] = t == 0 ? v : memops::fmin32(v, lo[d]);
          hi[d] = t == 0 ? v : memops::fmax32(v, hi[d]);
          sum[d] += v;
        }
      }
    }
    if (mode == kModeMinMaxInt8) {
      int8_t codes[2 * kMaxHeadDim];
#pragma HLS ARRAY_PARTITION variable = codes cyclic factor = 64
      // Elements past D are 0 in lo and hi: they change neither the magnitude nor the NaN flag.
      page_scales.write(
          memops::quantize_minmax_page(lo, hi, kMaxHeadDim, codes, codes + kMaxHeadDim));
      const int64_t code_words = row_words * lanes / kInt8Lanes;
    emit_code_rows:
      for (int r = 0; r < 2; ++r) {
      emit_code_words:
        for (int64_t w = 0; w < code_words; ++w) {
#pragma HLS PIPELINE II = 1
          word_t word = zero_word();
        pack_codes:
          for (int l = 0; l < kInt8Lanes; ++l) {
#pragma HLS UNROLL
            set_int8(word, l, codes[r * kMaxHeadDim + w * kInt8Lanes + l]);
          }
          summary_words.write(word);
        }
      }
      continue;
    }
  emit_words:
    for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
      if (mode == static_cast<int64_t>(memops::SummaryMode::kMinMax)) {
        summary_words.write(pack_word(lo + w * lanes, static_cast<int>(dtype)));
      } else {
        float mean[kMaxLanes];
      mean_lanes:
        for (int l = 0; l < kMaxLanes; ++l) {
#pragma HLS UNROLL
          mean[l] = l < lanes && n > 0 ? sum[w * lanes + l] / static_cast<float>(n) : 0.f;
        }
        summary_words.write(pack_word(mean, static_cast<int>(dtype)));
      }
    }
    if (mode == static_cast<int64_t>(memops::SummaryMode::kMinMax)) {
    emit_max_words:
      for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
        summary_words.write(pack_word(hi + w * lanes, static_cast<int>(dtype)));
      }
    }
  }
}

void store_pages(word_t* summary, int64_t summary_offset, int64_t batch, int64_t heads,
                 int64_t row_words, int64_t first_page, int64_t last_page, int64_t reps,
                 int64_t stride_b, int64_t stride_h, int64_t stride_n, int64_t stride_r,
                 float* scales, int64_t scales_offset, int64_t scale_stride_b,
                 int64_t scale_stride_h, int64_t scale_stride_n, bool int8_summary,
                 hls::stream<word_t>& summary_words, hls::stream<float>& page_scales) {
store_rows:
  for (int64_t b = 0; b < batch; ++b) {
  store_heads:
    for (int64_t h = 0; h < heads; ++h) {
    store_page:
      for (int64_t p = first_page; p < last_page; ++p) {
      store_reps:
        for (int64_t r = 0; r < reps; ++r) {
        store_words:
          for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
            summary[summary_offset + b * stride_b + h * stride_h + p * stride_n + r * stride_r +
                    w] = summary_words.read();
          }
        }
        if (int8_summary)
          scales[scales_offset + b * scale_stride_b + h * scale_stride_h + p * scale_stride_n] =
              page_scales.read();
      }
    }
  }
}

}  // namespace
}  // namespace memops_hls

extern "C" void memops_prepare_memory(
    const memops_hls::word_t* keys, memops_hls::word_t* summary, const int32_t* seq_lens,
    int64_t keys_offset, int64_t summary_offset, int64_t seq_lens_offset, int64_t batch,
    int64_t heads, int64_t row_words, int64_t page_size, int64_t first_page, int64_t last_page,
    int64_t key_stride_b, int64_t key_stride_h, int64_t key_stride_s, int64_t sum_stride_b,
    int64_t sum_stride_h, int64_t sum_stride_n, int64_t sum_stride_r, int64_t mode,
    int64_t dtype, float* scales, int64_t scales_offset, int64_t scale_stride_b,
    int64_t scale_stride_h, int64_t scale_stride_n) {
#pragma HLS INTERFACE m_axi port = keys offset = slave bundle = gmem_keys max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = scales offset = slave bundle = gmem_lens
#pragma HLS INTERFACE m_axi port = summary offset = slave bundle = gmem_summary max_write_burst_length = 64
#pragma HLS INTERFACE m_axi port = seq_lens offset = slave bundle = gmem_lens
#pragma HLS INTERFACE s_axilite port = return
  using namespace memops_hls;
  if (first_page >= last_page || batch * heads == 0) return;
  const bool int8_summary = mode == kModeMinMaxInt8;
  const int64_t reps =
      (mode == static_cast<int64_t>(memops::SummaryMode::kMinMax) || int8_summary) ? 2 : 1;
  // Words a summary row: the keys' row_words, or D / 64 for int8 codes.
  const int64_t out_row_words =
      int8_summary ? row_words * lanes_per_word(static_cast<int>(dtype)) / kInt8Lanes : row_words;
  hls::stream<PageJob> jobs;
  hls::stream<word_t> token_words;
  hls::stream<word_t> summary_words;
  hls::stream<float> page_scales;
#pragma HLS STREAM variable = page_scales depth = kStreamDepth
#pragma HLS STREAM variable = jobs depth = kStreamDepth
#pragma HLS STREAM variable = token_words depth = kStreamDepth
#pragma HLS STREAM variable = summary_words depth = kStreamDepth
#pragma HLS DATAFLOW
  load_pages(keys, seq_lens, keys_offset, seq_lens_offset, batch, heads, row_words, page_size,
             first_page, last_page, key_stride_b, key_stride_h, key_stride_s, jobs, token_words);
  summarise_pages(batch * heads * (last_page - first_page), row_words, mode, dtype, jobs,
                  token_words, summary_words, page_scales);
  store_pages(summary, summary_offset, batch, heads, out_row_words, first_page, last_page, reps,
              sum_stride_b, sum_stride_h, sum_stride_n, sum_stride_r, scales, scales_offset,
              scale_stride_b, scale_stride_h, scale_stride_n, int8_summary, summary_words,
              page_scales);
}
