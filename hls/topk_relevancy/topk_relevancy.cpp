// Relevancy + top-k on the FPGA: load (query heads, then the pages' representatives, as a stream
// of words) -> score (memops::score_* of relevancy.h, the CPU backend's float32 arithmetic in the
// same order) -> select (streaming replace-min top-k) -> store.
#include "topk_relevancy.h"

#include <cmath>

#include "memops/common.h"
#include "memops/relevancy.h"
#include "memops/topk.h"

namespace memops_hls {
namespace {

struct ScoredPage {
  float score;
  int32_t page;
};

struct Selected {
  float score;
  int32_t index;  // -1 for padding
};

void load_rows(const word_t* query, const word_t* summary, const int32_t* num_pages,
               int64_t query_offset, int64_t summary_offset, int64_t num_pages_offset,
               int64_t batch, int64_t kv_heads, int64_t group, int64_t reps, int64_t row_words,
               int64_t q_stride_b, int64_t q_stride_h, int64_t s_stride_b, int64_t s_stride_h,
               int64_t s_stride_n, int64_t s_stride_r, const float* scales,
               int64_t scales_offset, int64_t c_stride_b, int64_t c_stride_h, int64_t c_stride_n,
               bool int8_summary, int64_t summary_words, hls::stream<int64_t>& row_pages,
               hls::stream<word_t>& words) {
load_row:
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t valid = num_pages[num_pages_offset + b];
  load_kv_head:
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      row_pages.write(valid);
    load_query_heads:
      for (int64_t g = 0; g < group; ++g) {
      load_query_words:
        for (int64_t w = 0; w < row_words; ++w) {
#pragma HLS PIPELINE II = 1
          words.write(query[query_offset + b * q_stride_b + (kv * group + g) * q_stride_h + w]);
        }
      }
    load_pages:
      for (int64_t p = 0; p < valid; ++p) {
      load_reps:
        for (int64_t r = 0; r < reps; ++r) {
        load_rep_words:
          for (int64_t w = 0; w < summary_words; ++w) {
#pragma HLS PIPELINE II = 1
            words.write(summary[summary_offset + b * s_stride_b + kv * s_stride_h +
                                p * s_stride_n + r * s_stride_r + w]);
          }
        }
        if (int8_summary) {  // the page's scale, in lane 0 of one more word
          word_t scale_word = zero_word();
          set_bits32(scale_word, 0,
                     bits_from_float(scales[scales_offset + b * c_stride_b + kv * c_stride_h +
                                            p * c_stride_n]));
          words.write(scale_word);
        }
      }
    }
  }
}

// Rows are unpacked into buffers with a fixed stride of kMaxHeadDim, zero beyond `dim`, and
// scored over all kMaxHeadDim elements: the padding adds +0 terms to sums that start at +0, which
// leaves every bit of every score unchanged, and gives the score functions' d loop a constant trip
// count, so that the pipelined head loop unrolls it (one query head per cycle).
void score_rows(const float* weights, int64_t weights_offset, int64_t batch, int64_t kv_heads,
                int64_t group, int64_t reps, int64_t row_words, int64_t mode,
                int64_t group_reduce, int64_t dtype, bool int8_summary, int64_t summary_words,
                hls::stream<int64_t>& row_pages,
                hls::stream<word_t>& words, hls::stream<int64_t>& scored_rows,
                hls::stream<ScoredPage>& scored) {
  const auto relevancy = static_cast<memops::RelevancyMode>(mode);
  const auto reduce = static_cast<memops::GroupReduce>(group_reduce);
  float q[kMaxQueryHeads * kMaxHeadDim];
  float w_heads[kMaxQueryHeads];
  float rep[kMaxReps * kMaxHeadDim];
#pragma HLS ARRAY_PARTITION variable = q cyclic factor = kMaxHeadDim
#pragma HLS ARRAY_PARTITION variable = rep cyclic factor = kMaxHeadDim
  word_t row[kMaxRowWords];
clear_query:
  for (int i = 0; i < kMaxQueryHeads * kMaxHeadDim; ++i) q[i] = 0.f;
clear_reps:
  for (int i = 0; i < kMaxReps * kMaxHeadDim; ++i) rep[i] = 0.f;
score_row:
  for (int64_t b = 0; b < batch; ++b) {
  score_kv_head:
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      const int64_t valid = row_pages.read();
      scored_rows.write(valid);
    read_query_heads:
      for (int64_t g = 0; g < group; ++g) {
      read_query_words:
        for (int64_t w = 0; w < row_words; ++w) row[w] = words.read();
        unpack_row(row, static_cast<int>(row_words), static_cast<int>(dtype),
                   q + g * kMaxHeadDim);
      }
      if (relevancy == memops::RelevancyMode::kIndexer) {
      read_weights:
        for (int64_t g = 0; g < group; ++g) {
#pragma HLS PIPELINE II = 1
          w_heads[g] = weights[weights_offset + b * group + g];
        }
      }
    score_page:
      for (int64_t p = 0; p < valid; ++p) {
      read_reps:
        for (int64_t r = 0; r < reps; ++r) {
        read_rep_words:
          for (int64_t w = 0; w < summary_words; ++w) row[w] = words.read();
          if (int8_summary)
            unpack_codes(row, static_cast<int>(summary_words), rep + r * kMaxHeadDim);
          else
            unpack_row(row, static_cast<int>(row_words), static_cast<int>(dtype),
                       rep + r * kMaxHeadDim);
        }
        const float scale = int8_summary ? float_from_bits(get_bits32(words.read(), 0)) : 1.f;
        float score = 0.f;
        if (relevancy == memops::RelevancyMode::kIndexer) {
          score = memops::score_indexer(q, kMaxHeadDim, group, w_heads, rep, kMaxHeadDim);
        } else {
        reduce_group:
          for (int64_t g = 0; g < group; ++g) {
#pragma HLS PIPELINE II = 1
            const float* qg = q + g * kMaxHeadDim;
            const float s = relevancy == memops::RelevancyMode::kBound
                                ? memops::score_bound(qg, rep, rep + kMaxHeadDim, kMaxHeadDim)
                                : memops::score_dot(qg, rep, kMaxHeadDim, reps, kMaxHeadDim);
            score = memops::group_combine(score, s, g == 0, reduce);
          }
        }
        if (int8_summary) score = scale * score;  // quantize.h: the scale factors out
        scored.write(ScoredPage{score, static_cast<int32_t>(p)});
      }
    }
  }
}

// The kept pages form a binary heap whose root ranks last (a parent never ranks before its
// children), so each replacement costs one sift of at most log2(kMaxTopK) = 11 levels.
constexpr int kHeapLevels = 11;
static_assert((1 << kHeapLevels) >= kMaxTopK, "the sift loops must cover the heap's depth");

bool ranks_after(const float* score, const int32_t* page, int a, int b) {
  return memops::ranks_before(score[b], page[b], score[a], page[a]);
}

void swap_entries(float* score, int32_t* page, int a, int b) {
  const float s = score[a];
  const int32_t p = page[a];
  score[a] = score[b];
  page[a] = page[b];
  score[b] = s;
  page[b] = p;
}

void sift_up(float* score, int32_t* page, int i) {
sift_up_levels:
  for (int level = 0; level < kHeapLevels && i > 0; ++level) {
#pragma HLS PIPELINE II = 2
    const int parent = (i - 1) / 2;
    if (!ranks_after(score, page, i, parent)) break;
    swap_entries(score, page, i, parent);
    i = parent;
  }
}

void sift_down(float* score, int32_t* page, int count) {
  int i = 0;
sift_down_levels:
  for (int level = 0; level < kHeapLevels; ++level) {
#pragma HLS PIPELINE II = 2
    const int left = 2 * i + 1, right = left + 1;
    int last = i;
    if (left < count && ranks_after(score, page, left, last)) last = left;
    if (right < count && ranks_after(score, page, right, last)) last = right;
    if (last == i) break;
    swap_entries(score, page, i, last);
    i = last;
  }
}

void select_rows(int64_t rows, int64_t k, int64_t sink_pages, int64_t recent_pages,
                 hls::stream<int64_t>& scored_rows, hls::stream<ScoredPage>& scored,
                 hls::stream<Selected>& selected) {
  float page_score[kMaxPages];
  bool taken[kMaxPages];
  float top_score[kMaxTopK];
  int32_t top_page[kMaxTopK];
select_row:
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t valid = scored_rows.read();
    const int64_t budget = k - memops::num_forced_pages(valid, sink_pages, recent_pages);
    int count = 0;
  replace_min:
    for (int64_t p = 0; p < valid; ++p) {
      const ScoredPage in = scored.read();
      page_score[p] = in.score;
      const bool forced = memops::is_forced_page(p, valid, sink_pages, recent_pages);
      taken[p] = forced;
      if (forced || budget <= 0) continue;
      if (count < budget) {
        top_score[count] = in.score;
        top_page[count] = in.page;
        sift_up(top_score, top_page, count);
        ++count;
      } else if (memops::ranks_before(in.score, in.page, top_score[0], top_page[0])) {
        top_score[0] = in.score;
        top_page[0] = in.page;
        sift_down(top_score, top_page, count);
      }
    }
  mark_kept:
    for (int i = 0; i < count; ++i) {
#pragma HLS PIPELINE II = 1
      taken[top_page[i]] = true;
    }
    int64_t emitted = 0;
  emit_ascending:
    for (int64_t p = 0; p < valid; ++p) {
#pragma HLS PIPELINE II = 1
      if (taken[p]) {
        selected.write(Selected{page_score[p], static_cast<int32_t>(p)});
        ++emitted;
      }
    }
  emit_padding:
    for (int64_t j = emitted; j < k; ++j) {
#pragma HLS PIPELINE II = 1
      selected.write(Selected{-INFINITY, -1});
    }
  }
}

void store_rows(float* out_scores, int32_t* out_indices, int64_t scores_offset,
                int64_t indices_offset, int64_t rows, int64_t k,
                hls::stream<Selected>& selected) {
store_row:
  for (int64_t r = 0; r < rows; ++r) {
  store_slot:
    for (int64_t j = 0; j < k; ++j) {
#pragma HLS PIPELINE II = 1
      const Selected s = selected.read();
      out_scores[scores_offset + r * k + j] = s.score;
      out_indices[indices_offset + r * k + j] = s.index;
    }
  }
}

}  // namespace
}  // namespace memops_hls

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
    int64_t summary_dtype) {
#pragma HLS INTERFACE m_axi port = query offset = slave bundle = gmem_query
#pragma HLS INTERFACE m_axi port = scales offset = slave bundle = gmem_control
#pragma HLS INTERFACE m_axi port = summary offset = slave bundle = gmem_summary max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = num_pages offset = slave bundle = gmem_control
#pragma HLS INTERFACE m_axi port = weights offset = slave bundle = gmem_weights
#pragma HLS INTERFACE m_axi port = out_scores offset = slave bundle = gmem_out
#pragma HLS INTERFACE m_axi port = out_indices offset = slave bundle = gmem_out
#pragma HLS INTERFACE s_axilite port = return
  using namespace memops_hls;
  if (batch * kv_heads == 0) return;
  const int64_t group = q_heads / kv_heads;
  const bool int8_summary = summary_dtype == kInt8;
  const int64_t summary_words =
      int8_summary ? row_words * lanes_per_word(static_cast<int>(dtype)) / kInt8Lanes : row_words;
  hls::stream<int64_t> row_pages, scored_rows;
  hls::stream<word_t> words;
  hls::stream<ScoredPage> scored;
  hls::stream<Selected> selected;
#pragma HLS STREAM variable = words depth = kStreamDepth
#pragma HLS STREAM variable = scored depth = kStreamDepth
#pragma HLS STREAM variable = selected depth = kStreamDepth
#pragma HLS DATAFLOW
  load_rows(query, summary, num_pages, query_offset, summary_offset, num_pages_offset, batch,
            kv_heads, group, reps, row_words, q_stride_b, q_stride_h, sum_stride_b, sum_stride_h,
            sum_stride_n, sum_stride_r, scales, scales_offset, scale_stride_b, scale_stride_h,
            scale_stride_n, int8_summary, summary_words, row_pages, words);
  score_rows(weights, weights_offset, batch, kv_heads, group, reps, row_words, mode,
             group_reduce, dtype, int8_summary, summary_words, row_pages, words, scored_rows,
             scored);
  select_rows(batch * kv_heads, k, sink_pages, recent_pages, scored_rows, scored, selected);
  store_rows(out_scores, out_indices, scores_offset, indices_offset, batch * kv_heads, k,
             selected);
}
