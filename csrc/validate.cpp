#include "validate.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace memops {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "memops.", op, ": `", name,
              "` must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* layout) {
  TORCH_CHECK(t.dim() == dim, "memops.", op, ": `", name, "` must have ", dim, " dims ",
              layout, ", got ", t.dim(), " dims ", t.sizes());
}

void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "memops.", op, ": the last dim of `", name,
              "` must be contiguous (stride 1), got strides ", t.strides());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "memops.", op, ": `", name, "` is on ", t.device(),
              " but `", ref_name, "` is on ", ref.device(),
              "; move both to the device that runs this step");
}

void check_int32_vector(const char* op, const char* name, const at::Tensor& t, int64_t batch,
                        const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "memops.", op, ": `", name, "` must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "memops.", op, ": `", name,
              "` must have shape [B] = [", batch, "], got ", t.sizes());
  check_same_device(op, name, t, ref_name, ref);
}

// Token and page counts are int32 in the kernels' outputs and lengths (seq_lens, lengths,
// indices), so a page size, a k and the k * page_size tokens of a selection stay below 2^31.
constexpr int64_t kMaxCount = std::numeric_limits<int32_t>::max();

void check_page_size(const char* op, int64_t page_size) {
  TORCH_CHECK_VALUE(page_size > 0, "memops.", op, ": `page_size` must be > 0, got ", page_size);
  TORCH_CHECK_VALUE(page_size <= kMaxCount, "memops.", op, ": `page_size` must be <= 2^31 - 1 (",
                    kMaxCount, ", token counts are int32), got ", page_size);
}

void check_selected_tokens(const char* op, int64_t k, int64_t page_size) {
  TORCH_CHECK_VALUE(k <= kMaxCount / page_size, "memops.", op,
                    ": `indices` selects k * page_size = ", k, " * ", page_size,
                    " tokens per row, more than 2^31 - 1 (", kMaxCount,
                    ", token counts are int32)");
}

void check_seq_lens(const char* op, const std::optional<at::Tensor>& seq_lens,
                    const at::Tensor& ref, const char* ref_name) {
  if (seq_lens.has_value())
    check_int32_vector(op, "seq_lens", *seq_lens, ref.size(0), ref_name, ref);
}

}  // namespace

SummaryMode parse_summary_mode(const std::string& op, const std::string& mode) {
  if (mode == "minmax") return SummaryMode::kMinMax;
  if (mode == "mean") return SummaryMode::kMean;
  TORCH_CHECK_VALUE(false, "memops.", op, ": `mode` must be \"minmax\" or \"mean\", got \"",
                    mode, "\"");
}

RelevancyMode parse_relevancy_mode(const std::string& op, const std::string& mode) {
  if (mode == "bound") return RelevancyMode::kBound;
  if (mode == "dot") return RelevancyMode::kDot;
  if (mode == "indexer") return RelevancyMode::kIndexer;
  TORCH_CHECK_VALUE(false, "memops.", op,
                    ": `mode` must be \"bound\", \"dot\" or \"indexer\", got \"", mode, "\"");
}

GroupReduce parse_group_reduce(const std::string& op, const std::string& group_reduce) {
  if (group_reduce == "max") return GroupReduce::kMax;
  if (group_reduce == "sum") return GroupReduce::kSum;
  TORCH_CHECK_VALUE(false, "memops.", op, ": `group_reduce` must be \"max\" or \"sum\", got \"",
                    group_reduce, "\"");
}

void check_prepare_memory(const at::Tensor& keys, int64_t page_size, const std::string& mode,
                          const std::optional<at::Tensor>& seq_lens) {
  const char* op = "prepare_memory";
  check_dim(op, "keys", keys, 4, "[B, Hkv, S, D]");
  check_float(op, "keys", keys);
  check_last_dim_contiguous(op, "keys", keys);
  check_page_size(op, page_size);
  parse_summary_mode(op, mode);
  check_seq_lens(op, seq_lens, keys, "keys");
}

void check_prepare_memory_inplace(const at::Tensor& summary, const at::Tensor& keys,
                                  int64_t page_size, int64_t first_page, const std::string& mode,
                                  const std::optional<at::Tensor>& seq_lens) {
  const char* op = "prepare_memory_";
  check_dim(op, "keys", keys, 4, "[B, Hkv, S, D]");
  check_float(op, "keys", keys);
  check_last_dim_contiguous(op, "keys", keys);
  check_page_size(op, page_size);
  const SummaryMode m = parse_summary_mode(op, mode);
  check_seq_lens(op, seq_lens, keys, "keys");
  check_dim(op, "summary", summary, 5, "[B, Hkv, N, R, D]");
  check_same_device(op, "summary", summary, "keys", keys);
  TORCH_CHECK(summary.scalar_type() == keys.scalar_type(), "memops.", op,
              ": `summary` must have the dtype of `keys` (", keys.scalar_type(), "), got ",
              summary.scalar_type());
  check_last_dim_contiguous(op, "summary", summary);
  // Pages are written in parallel: two pages sharing memory (an expanded view) would race.
  TORCH_CHECK(at::has_internal_overlap(summary) != at::MemOverlap::Yes, "memops.", op,
              ": `summary` has elements that share memory (strides ", summary.strides(),
              "); pass a tensor whose elements are distinct, e.g. summary.contiguous()");
  const int64_t n_pages = ceil_div(keys.size(2), page_size);
  const int64_t reps = m == SummaryMode::kMinMax ? 2 : 1;
  TORCH_CHECK(summary.size(0) == keys.size(0) && summary.size(1) == keys.size(1) &&
                  summary.size(2) >= n_pages && summary.size(3) == reps &&
                  summary.size(4) == keys.size(3),
              "memops.", op, ": `summary` must have shape [B, Hkv, >= ceil(S/P), R, D] = [",
              keys.size(0), ", ", keys.size(1), ", >= ", n_pages, ", ", reps, ", ", keys.size(3),
              "] for mode \"", mode, "\", got ", summary.sizes());
  TORCH_CHECK_VALUE(first_page >= 0, "memops.", op, ": `first_page` must be >= 0, got ",
                    first_page);
}

namespace {

// The keys side of both int8 Prepare ops.
void check_int8_keys(const char* op, const at::Tensor& keys, int64_t page_size,
                     const std::optional<at::Tensor>& seq_lens) {
  check_dim(op, "keys", keys, 4, "[B, Hkv, S, D]");
  check_float(op, "keys", keys);
  check_last_dim_contiguous(op, "keys", keys);
  check_page_size(op, page_size);
  check_seq_lens(op, seq_lens, keys, "keys");
}

}  // namespace

void check_prepare_memory_int8(const at::Tensor& keys, int64_t page_size,
                               const std::optional<at::Tensor>& seq_lens) {
  check_int8_keys("prepare_memory_int8", keys, page_size, seq_lens);
}

void check_prepare_memory_int8_inplace(const at::Tensor& summary, const at::Tensor& scales,
                                       const at::Tensor& keys, int64_t page_size,
                                       int64_t first_page,
                                       const std::optional<at::Tensor>& seq_lens) {
  const char* op = "prepare_memory_int8_";
  check_int8_keys(op, keys, page_size, seq_lens);
  check_dim(op, "summary", summary, 5, "[B, Hkv, N, 2, D]");
  check_same_device(op, "summary", summary, "keys", keys);
  TORCH_CHECK(summary.scalar_type() == at::kChar, "memops.", op,
              ": `summary` must be int8, got ", summary.scalar_type());
  check_last_dim_contiguous(op, "summary", summary);
  check_dim(op, "scales", scales, 3, "[B, Hkv, N]");
  check_same_device(op, "scales", scales, "keys", keys);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "memops.", op,
              ": `scales` must be float32, got ", scales.scalar_type());
  for (const auto* t : {&summary, &scales}) {
    const char* name = t == &summary ? "summary" : "scales";
    TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "memops.", op, ": `", name,
                "` has elements that share memory (strides ", t->strides(),
                "); pass a tensor whose elements are distinct, e.g. ", name, ".contiguous()");
  }
  const int64_t n_pages = ceil_div(keys.size(2), page_size);
  TORCH_CHECK(summary.size(0) == keys.size(0) && summary.size(1) == keys.size(1) &&
                  summary.size(2) >= n_pages && summary.size(3) == 2 &&
                  summary.size(4) == keys.size(3),
              "memops.", op, ": `summary` must have shape [B, Hkv, >= ceil(S/P), 2, D] = [",
              keys.size(0), ", ", keys.size(1), ", >= ", n_pages, ", 2, ", keys.size(3),
              "], got ", summary.sizes());
  TORCH_CHECK(scales.size(0) == summary.size(0) && scales.size(1) == summary.size(1) &&
                  scales.size(2) == summary.size(2),
              "memops.", op, ": `scales` must have shape [B, Hkv, N] = [", summary.size(0), ", ",
              summary.size(1), ", ", summary.size(2), "] (N of `summary`), got ", scales.sizes());
  TORCH_CHECK_VALUE(first_page >= 0, "memops.", op, ": `first_page` must be >= 0, got ",
                    first_page);
}

void check_topk_relevancy(const at::Tensor& query, const at::Tensor& summary, int64_t k,
                          const std::string& mode, const std::optional<at::Tensor>& num_pages,
                          int64_t sink_pages, int64_t recent_pages,
                          const std::string& group_reduce,
                          const std::optional<at::Tensor>& weights,
                          const std::optional<at::Tensor>& summary_scales, const char* op) {
  check_dim(op, "query", query, 3, "[B, Hq, D]");
  check_dim(op, "summary", summary, 5, "[B, Hkv, N, R, D]");
  check_float(op, "query", query);
  check_same_device(op, "summary", summary, "query", query);
  check_last_dim_contiguous(op, "query", query);
  check_last_dim_contiguous(op, "summary", summary);
  if (summary.scalar_type() == at::kChar) {
    // An int8 summary (prepare_memory_int8): bound mode only, with its per-page scales.
    TORCH_CHECK_VALUE(mode == "bound", "memops.", op,
                      ": an int8 `summary` is scored in mode \"bound\" only, got mode \"", mode,
                      "\"");
    TORCH_CHECK_VALUE(summary_scales.has_value(), "memops.", op,
                      ": an int8 `summary` needs `summary_scales` (float32 [B, Hkv, N]), as "
                      "prepare_memory_int8 returns them");
    const at::Tensor& sc = *summary_scales;
    TORCH_CHECK(sc.scalar_type() == at::kFloat, "memops.", op,
                ": `summary_scales` must be float32, got ", sc.scalar_type());
    check_same_device(op, "summary_scales", sc, "query", query);
    TORCH_CHECK(sc.dim() == 3 && sc.size(0) == summary.size(0) &&
                    sc.size(1) == summary.size(1) && sc.size(2) == summary.size(2),
                "memops.", op, ": `summary_scales` must have shape [B, Hkv, N] = [",
                summary.size(0), ", ", summary.size(1), ", ", summary.size(2), "], got ",
                sc.sizes());
  } else {
    TORCH_CHECK(is_float_dtype(summary.scalar_type()), "memops.", op,
                ": `summary` must be float32, float16, bfloat16 or int8 (with "
                "`summary_scales`), got ", summary.scalar_type());
    TORCH_CHECK(query.scalar_type() == summary.scalar_type(), "memops.", op,
                ": `query` and `summary` must have the same dtype, got ", query.scalar_type(),
                " and ", summary.scalar_type());
    TORCH_CHECK_VALUE(!summary_scales.has_value(), "memops.", op,
                      ": `summary_scales` is only used with an int8 `summary`, got a ",
                      summary.scalar_type(), " summary");
  }
  TORCH_CHECK(query.size(0) == summary.size(0), "memops.", op,
              ": `query` and `summary` must have the same batch size B, got ", query.size(0),
              " and ", summary.size(0));
  TORCH_CHECK(query.size(2) == summary.size(4), "memops.", op,
              ": `query` and `summary` must have the same head dim D, got ", query.size(2),
              " and ", summary.size(4));
  TORCH_CHECK_VALUE(k > 0, "memops.", op, ": `k` must be > 0, got ", k);
  TORCH_CHECK_VALUE(k <= kMaxCount, "memops.", op, ": `k` must be <= 2^31 - 1 (", kMaxCount,
                    ", page indices are int32), got ", k);
  TORCH_CHECK_VALUE(sink_pages >= 0 && recent_pages >= 0, "memops.", op,
                    ": `sink_pages` and `recent_pages` must be >= 0, got ", sink_pages, " and ",
                    recent_pages);
  TORCH_CHECK_VALUE(sink_pages + recent_pages <= k, "memops.", op,
                    ": `sink_pages + recent_pages` (", sink_pages + recent_pages,
                    ") must be <= `k` (", k, "): forced pages count toward k");
  parse_group_reduce(op, group_reduce);
  const RelevancyMode m = parse_relevancy_mode(op, mode);
  const int64_t hq = query.size(1), hkv = summary.size(1), reps = summary.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "memops.", op,
              ": query heads Hq must be a multiple of summary heads Hkv, got Hq = ", hq,
              ", Hkv = ", hkv);
  if (m == RelevancyMode::kBound) {
    TORCH_CHECK_VALUE(reps == 2, "memops.", op,
                      ": mode \"bound\" needs a minmax `summary` (R = 2), got R = ", reps);
  } else if (m == RelevancyMode::kDot) {
    TORCH_CHECK_VALUE(reps >= 1, "memops.", op, ": mode \"dot\" needs R >= 1, got R = ", reps);
  } else {
    TORCH_CHECK_VALUE(hkv == 1 && reps == 1, "memops.", op,
                      ": mode \"indexer\" needs `summary` of shape [B, 1, N, 1, D], got ",
                      summary.sizes());
  }
  if (m == RelevancyMode::kIndexer) {
    TORCH_CHECK_VALUE(weights.has_value(), "memops.", op,
                      ": mode \"indexer\" needs `weights` of shape [B, Hi]");
    const at::Tensor& w = *weights;
    check_same_device(op, "weights", w, "query", query);
    check_float(op, "weights", w);
    TORCH_CHECK(w.dim() == 2 && w.size(0) == query.size(0) && w.size(1) == hq, "memops.", op,
                ": `weights` must have shape [B, Hi] = [", query.size(0), ", ", hq, "], got ",
                w.sizes());
  } else {
    TORCH_CHECK_VALUE(!weights.has_value(), "memops.", op,
                      ": `weights` is only used with mode \"indexer\", got mode \"", mode, "\"");
  }
  if (num_pages.has_value())
    check_int32_vector(op, "num_pages", *num_pages, query.size(0), "query", query);
}

void check_gather_retrieve(const at::Tensor& memory, const at::Tensor& indices, int64_t page_size,
                           const std::optional<at::Tensor>& seq_lens) {
  const char* op = "gather_retrieve";
  check_dim(op, "memory", memory, 4, "[B, H, S, D]");
  check_last_dim_contiguous(op, "memory", memory);
  check_dim(op, "indices", indices, 3, "[B, H, k]");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "memops.", op,
              ": `indices` must be int32, got ", indices.scalar_type());
  check_same_device(op, "indices", indices, "memory", memory);
  TORCH_CHECK(indices.size(0) == memory.size(0) && indices.size(1) == memory.size(1), "memops.",
              op, ": `indices` must have shape [B, H, k] with B, H of `memory` (", memory.size(0),
              ", ", memory.size(1), "), got ", indices.sizes());
  check_page_size(op, page_size);
  check_selected_tokens(op, indices.size(2), page_size);
  check_seq_lens(op, seq_lens, memory, "memory");
}

void check_sparse_apply(const at::Tensor& query, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const std::optional<at::Tensor>& indices,
                        int64_t page_size, const std::optional<at::Tensor>& seq_lens,
                        std::optional<double> scale, const char* op) {
  check_dim(op, "query", query, 3, "[B, Hq, D]");
  check_dim(op, "k_cache", k_cache, 4, "[B, Hkv, S, D]");
  check_dim(op, "v_cache", v_cache, 4, "[B, Hkv, S, D]");
  check_float(op, "query", query);
  check_same_device(op, "k_cache", k_cache, "query", query);
  check_same_device(op, "v_cache", v_cache, "query", query);
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() &&
                  v_cache.scalar_type() == query.scalar_type(),
              "memops.", op, ": `query`, `k_cache` and `v_cache` must have the same dtype, got ",
              query.scalar_type(), ", ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
  check_last_dim_contiguous(op, "query", query);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "v_cache", v_cache);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "memops.", op,
              ": `k_cache` and `v_cache` must have the same shape, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  TORCH_CHECK(query.size(0) == k_cache.size(0) && query.size(2) == k_cache.size(3), "memops.",
              op, ": `query` [B, Hq, D] must match `k_cache` [B, Hkv, S, D] in B and D, got ",
              query.sizes(), " and ", k_cache.sizes());
  const int64_t hq = query.size(1), hkv = k_cache.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "memops.", op,
              ": query heads Hq must be a multiple of kv heads Hkv, got Hq = ", hq, ", Hkv = ",
              hkv);
  check_page_size(op, page_size);
  if (indices.has_value()) {
    const at::Tensor& idx = *indices;
    TORCH_CHECK(idx.scalar_type() == at::kInt, "memops.", op, ": `indices` must be int32, got ",
                idx.scalar_type());
    check_same_device(op, "indices", idx, "query", query);
    TORCH_CHECK(idx.dim() == 3 && idx.size(0) == query.size(0) &&
                    (idx.size(1) == hkv || idx.size(1) == hq),
                "memops.", op, ": `indices` must have shape [B, Hkv, k] = [", query.size(0), ", ",
                hkv, ", k] or [B, Hq, k] = [", query.size(0), ", ", hq, ", k], got ",
                idx.sizes());
    check_selected_tokens(op, idx.size(2), page_size);
  }
  check_seq_lens(op, seq_lens, query, "query");
  // A softmax scale of NaN or inf turns every logit into NaN or +-inf: reject it rather than
  // return NaN with lse = -inf. Zero or negative scales are not attention (docs/design.md).
  if (scale.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0.0, "memops.", op,
                      ": `scale` must be a finite number > 0 (default D ** -0.5), got ", *scale);
}

void check_merge_attention(const at::Tensor& out_a, const at::Tensor& lse_a,
                           const at::Tensor& out_b, const at::Tensor& lse_b) {
  const char* op = "merge_attention";
  TORCH_CHECK(out_a.dim() >= 1, "memops.", op, ": `out_a` must have at least 1 dim [..., D]");
  check_float(op, "out_a", out_a);
  check_last_dim_contiguous(op, "out_a", out_a);
  check_last_dim_contiguous(op, "out_b", out_b);
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type(),
              "memops.", op, ": `out_b` must match `out_a` in shape and dtype, got ",
              out_b.sizes(), " ", out_b.scalar_type(), " and ", out_a.sizes(), " ",
              out_a.scalar_type());
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  for (const auto* pair : {&lse_a, &lse_b}) {
    const char* name = pair == &lse_a ? "lse_a" : "lse_b";
    TORCH_CHECK(pair->scalar_type() == at::kFloat, "memops.", op, ": `", name,
                "` must be float32, got ", pair->scalar_type());
    TORCH_CHECK(pair->sizes() == lead, "memops.", op, ": `", name,
                "` must have the leading shape of `out_a` ", lead, ", got ", pair->sizes());
  }
  check_same_device(op, "lse_a", lse_a, "out_a", out_a);
  check_same_device(op, "out_b", out_b, "out_a", out_a);
  check_same_device(op, "lse_b", lse_b, "out_a", out_a);
}

at::Tensor new_summary(const at::Tensor& keys, int64_t page_size, SummaryMode mode) {
  return at::empty({keys.size(0), keys.size(1), ceil_div(keys.size(2), page_size),
                    mode == SummaryMode::kMinMax ? 2 : 1, keys.size(3)},
                   keys.options());
}

std::tuple<at::Tensor, at::Tensor> new_int8_summary(const at::Tensor& keys, int64_t page_size) {
  const int64_t n = ceil_div(keys.size(2), page_size);
  return {at::empty({keys.size(0), keys.size(1), n, 2, keys.size(3)},
                    keys.options().dtype(at::kChar)),
          at::empty({keys.size(0), keys.size(1), n}, keys.options().dtype(at::kFloat))};
}

void check_seq_lens_values(const char* op, const std::optional<at::Tensor>& seq_lens,
                           int64_t num_tokens) {
  if (!seq_lens.has_value()) return;
  const at::Tensor lens = seq_lens->cpu().contiguous();
  const int32_t* p = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.numel(); ++b)
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= num_tokens, "memops.", op, ": `seq_lens[", b,
                      "]` = ", p[b], " is outside [0, S] = [0, ", num_tokens, "]");
}

void check_num_pages_values(const char* op, const std::optional<at::Tensor>& num_pages,
                            int64_t num_pages_total) {
  if (!num_pages.has_value()) return;
  const at::Tensor n = num_pages->cpu().contiguous();
  const int32_t* p = n.data_ptr<int32_t>();
  for (int64_t b = 0; b < n.numel(); ++b)
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] <= num_pages_total, "memops.", op, ": `num_pages[", b,
                      "]` = ", p[b], " is outside [0, N] = [0, ", num_pages_total, "]");
}

void check_indices_values(const char* op, const at::Tensor& indices, int64_t num_pages_total) {
  const at::Tensor idx = indices.cpu().contiguous();
  const int32_t* p = idx.data_ptr<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] >= -1 && p[i] < num_pages_total, "memops.", op,
                      ": `indices` holds page ", p[i], " (flat position ", i,
                      "), outside [-1, N) = [-1, ", num_pages_total, ")");
}

void check_topk_sparse_apply(const at::Tensor& query, const at::Tensor& summary,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t k,
                             int64_t page_size, const std::string& mode,
                             const std::optional<at::Tensor>& num_pages,
                             const std::optional<at::Tensor>& seq_lens, int64_t sink_pages,
                             int64_t recent_pages, const std::string& group_reduce,
                             std::optional<double> scale,
                             const std::optional<at::Tensor>& summary_scales) {
  const char* op = "topk_sparse_apply";
  TORCH_CHECK_VALUE(mode == "bound" || mode == "dot", "memops.", op,
                    ": `mode` must be 'bound' or 'dot' (page scores; the indexer selects tokens: "
                    "call topk_relevancy and sparse_apply), got '", mode, "'");
  check_topk_relevancy(query, summary, k, mode, num_pages, sink_pages, recent_pages, group_reduce,
                       std::nullopt, summary_scales, op);
  check_sparse_apply(query, k_cache, v_cache, std::nullopt, page_size, seq_lens, scale, op);
  TORCH_CHECK_VALUE(k <= kMaxCount / page_size, "memops.", op, ": `k` * `page_size` = ", k, " * ",
                    page_size, " selected tokens per row, more than 2^31 - 1 (token counts are int32)");
  TORCH_CHECK(summary.size(0) == k_cache.size(0) && summary.size(1) == k_cache.size(1), "memops.",
              op, ": `summary` [B, Hkv, N, R, D] must match `k_cache` [B, Hkv, S, D] in B and Hkv, "
              "got ", summary.sizes(), " and ", k_cache.sizes());
  const int64_t cache_pages = (k_cache.size(2) + page_size - 1) / page_size;
  TORCH_CHECK(summary.size(2) <= cache_pages, "memops.", op, ": `summary` has N = ",
              summary.size(2), " pages but `k_cache` holds ceil(S / page_size) = ", cache_pages,
              " (S = ", k_cache.size(2), ", page_size = ", page_size,
              "): every page it may select must be in the cache");
}

}  // namespace memops
