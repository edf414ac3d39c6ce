#include <torch/library.h>

#include "cuda/cuda_common.h"
#include "validate.h"

namespace memops {
namespace {

void summarise_pages(const at::Tensor& keys, at::Tensor& summary, int64_t page_size,
                     int64_t first_page, SummaryMode mode,
                     const std::optional<at::Tensor>& seq_lens) {
  const int64_t pages = ceil_div(keys.size(2), page_size);
  if (first_page >= pages) return;
  at::Tensor lens_holder;
  PrepareMemoryParams p{};
  p.keys = keys.const_data_ptr();
  p.summary = summary.mutable_data_ptr();
  p.seq_lens = optional_int_data(seq_lens, lens_holder);
  p.batch = keys.size(0);
  p.heads = keys.size(1);
  p.tokens = keys.size(2);
  p.dim = keys.size(3);
  p.page_size = page_size;
  p.first_page = first_page;
  p.num_pages = pages;
  for (int i = 0; i < 3; ++i) p.key_stride[i] = keys.stride(i);
  for (int i = 0; i < 4; ++i) p.summary_stride[i] = summary.stride(i);
  p.mode = mode;
  p.value_errors = value_error_word_ptr();
  check_launch(cuda::launch_prepare_memory(p, element_type(keys),
                                            allows_vector(keys) && allows_vector(summary),
                                            grid_limit(16), current_stream()),
               "prepare_memory");
}

}  // namespace

at::Tensor prepare_memory_cuda(const at::Tensor& keys, int64_t page_size, c10::string_view mode,
                               const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory(keys, page_size, mode_s, seq_lens);
  const c10::cuda::CUDAGuard guard(keys.device());
  if (value_checks_now()) check_seq_lens_values("prepare_memory", seq_lens, keys.size(2));
  const SummaryMode m = parse_summary_mode("prepare_memory", mode_s);
  at::Tensor summary = new_summary(keys, page_size, m);
  summarise_pages(keys, summary, page_size, 0, m, seq_lens);
  return summary;
}

void prepare_memory_inplace_cuda(at::Tensor& summary, const at::Tensor& keys, int64_t page_size,
                                 int64_t first_page, c10::string_view mode,
                                 const std::optional<at::Tensor>& seq_lens) {
  const std::string mode_s(mode);
  check_prepare_memory_inplace(summary, keys, page_size, first_page, mode_s, seq_lens);
  const c10::cuda::CUDAGuard guard(keys.device());
  if (value_checks_now()) check_seq_lens_values("prepare_memory_", seq_lens, keys.size(2));
  summarise_pages(keys, summary, page_size, first_page,
                  parse_summary_mode("prepare_memory_", mode_s), seq_lens);
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) {
  m.impl("prepare_memory", &prepare_memory_cuda);
  m.impl("prepare_memory_", &prepare_memory_inplace_cuda);
}

}  // namespace memops
