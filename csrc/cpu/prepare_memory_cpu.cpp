#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_common.h"
#include "memops/prepare_memory.h"
#include "memops/quantize.h"
#include "validate.h"

namespace memops {
namespace {

// summarise_page compiled for AVX2 and for the baseline ISA (min/max and sums are exact per lane:
// the bits do not depend on the clone).
template <typename T>
MEMOPS_CPU_MULTIVERSION void summarise_page_cpu(const T* tokens, int64_t token_stride, int64_t n,
                                                int64_t dim, SummaryMode mode, float* lo,
                                                float* hi, T* out_first, T* out_second) {
  summarise_page(tokens, token_stride, n, dim, mode, lo, hi, out_first, out_second);
}

template <typename T>
void summarise_pages(const at::Tensor& keys, at::Tensor& summary, int64_t page_size,
                     int64_t first_page, SummaryMode mode, const int32_t* lens) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  const int64_t pages = ceil_div(S, page_size) - first_page;
  if (pages <= 0 || B * H == 0) return;
  const T* kp = keys.const_data_ptr<T>();
  T* sp = summary.mutable_data_ptr<T>();
  const auto ks = keys.strides();
  const auto ss = summary.strides();
  at::parallel_for(0, B * H * pages, grain_for(page_size * D), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * pages), h = (i / pages) % H, p = first_page + i % pages;
      const int64_t n = page_valid_tokens(p, page_size, row_length(lens, b, S));
      const T* tokens = kp + b * ks[0] + h * ks[1] + p * page_size * ks[2];
      T* out = sp + b * ss[0] + h * ss[1] + p * ss[2];
      summarise_page_cpu(tokens, ks[2], n, D, mode, scratch.data(), scratch.data() + D, out,
                         mode == SummaryMode::kMinMax ? out + ss[3] : nullptr);
    }
  });
}

// minmax_int8: the exact minmax summary of each page (summarise_page, in the keys' dtype: min and
// max of representable values round-trip exactly), then quantize_minmax_page.
template <typename T>
MEMOPS_CPU_MULTIVERSION void quantise_page_cpu(const T* tokens, int64_t token_stride, int64_t n,
                                               int64_t dim, float* scratch, T* exact,
                                               int8_t* out_lo, int8_t* out_hi, float* scale) {
  summarise_page(tokens, token_stride, n, dim, SummaryMode::kMinMax, scratch, scratch + dim,
                 exact, exact + dim);
  for (int64_t d = 0; d < 2 * dim; ++d) scratch[d] = to_float(exact[d]);
  *scale = quantize_minmax_page(scratch, scratch + dim, dim, out_lo, out_hi);
}

template <typename T>
void quantise_pages(const at::Tensor& keys, at::Tensor& summary, at::Tensor& scales,
                    int64_t page_size, int64_t first_page, const int32_t* lens) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  const int64_t pages = ceil_div(S, page_size) - first_page;
  if (pages <= 0 || B * H == 0) return;
  const T* kp = keys.const_data_ptr<T>();
  int8_t* sp = summary.mutable_data_ptr<int8_t>();
  float* cp = scales.mutable_data_ptr<float>();
  const auto ks = keys.strides();
  const auto ss = summary.strides();
  const auto cs = scales.strides();
  at::parallel_for(0, B * H * pages, grain_for(page_size * D), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * D);
    std::vector<T> exact(2 * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * pages), h = (i / pages) % H, p = first_page + i % pages;
      const int64_t n = page_valid_tokens(p, page_size, row_length(lens, b, S));
      const T* tokens = kp + b * ks[0] + h * ks[1] + p * page_size * ks[2];
      int8_t* out = sp + b * ss[0] + h * ss[1] + p * ss[2];
      quantise_page_cpu(tokens, ks[2], n, D, scratch.data(), exact.data(), out, out + ss[3],
                        cp + b * cs[0] + h * cs[1] + p * cs[2]);
    }
  });
}

void run_int8(const at::Tensor& keys, at::Tensor& summary, at::Tensor& scales, int64_t page_size,
              int64_t first_page, const std::optional<at::Tensor>& seq_lens) {
  at::Tensor lens_holder;
  const int32_t* lens = optional_int_ptr(seq_lens, lens_holder);
  MEMOPS_DISPATCH_FLOAT(keys.scalar_type(), "prepare_memory_int8_cpu", [&] {
    quantise_pages<scalar_t>(keys, summary, scales, page_size, first_page, lens);
  });
}

void run(const at::Tensor& keys, at::Tensor& summary, int64_t page_size, int64_t first_page,
         SummaryMode mode, const std::optional<at::Tensor>& seq_lens) {
  at::Tensor lens_holder;
  const int32_t* lens = optional_int_ptr(seq_lens, lens_holder);
  MEMOPS_DISPATCH_FLOAT(keys.scalar_type(), "prepare_memory_cpu", [&] {
    summarise_pages<scalar_t>(keys, summary, page_size, first_page, mode, lens);
  });
}

}  // namespace

at::Tensor prepare_memory_cpu(const at::Tensor& keys, int64_t page_size, c10::string_view mode,
                              const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory(keys, page_size, mode_s, seq_lens);
  check_seq_lens_values("prepare_memory", seq_lens, keys.size(2));
  const SummaryMode m = parse_summary_mode("prepare_memory", mode_s);
  at::Tensor summary = new_summary(keys, page_size, m);
  run(keys, summary, page_size, 0, m, seq_lens);
  return summary;
}

void prepare_memory_inplace_cpu(at::Tensor& summary, const at::Tensor& keys, int64_t page_size,
                                int64_t first_page, c10::string_view mode,
                                const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory_inplace(summary, keys, page_size, first_page, mode_s, seq_lens);
  check_seq_lens_values("prepare_memory_", seq_lens, keys.size(2));
  run(keys, summary, page_size, first_page, parse_summary_mode("prepare_memory_", mode_s),
      seq_lens);
}

std::tuple<at::Tensor, at::Tensor> prepare_memory_int8_cpu(
    const at::Tensor& keys, int64_t page_size, const std::optional<at::Tensor>& seq_lens) {
  check_prepare_memory_int8(keys, page_size, seq_lens);
  check_seq_lens_values("prepare_memory_int8", seq_lens, keys.size(2));
  auto [summary, scales] = new_int8_summary(keys, page_size);
  run_int8(keys, summary, scales, page_size, 0, seq_lens);
  return {summary, scales};
}

void prepare_memory_int8_inplace_cpu(at::Tensor& summary, at::Tensor& scales,
                                     const at::Tensor& keys, int64_t page_size,
                                     int64_t first_page,
                                     const std::optional<at::Tensor>& seq_lens) {
  check_prepare_memory_int8_inplace(summary, scales, keys, page_size, first_page, seq_lens);
  check_seq_lens_values("prepare_memory_int8_", seq_lens, keys.size(2));
  run_int8(keys, summary, scales, page_size, first_page, seq_lens);
}

TORCH_LIBRARY_IMPL(memops, CPU, m) {
  m.impl("prepare_memory", &prepare_memory_cpu);
  m.impl("prepare_memory_", &prepare_memory_inplace_cpu);
  m.impl("prepare_memory_int8", &prepare_memory_int8_cpu);
  m.impl("prepare_memory_int8_", &prepare_memory_int8_inplace_cpu);
}

}  // namespace memops
