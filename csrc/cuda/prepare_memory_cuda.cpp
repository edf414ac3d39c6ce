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

void quantise_pages(const at::Tensor& keys, at::Tensor& codes, at::Tensor& scales,
                    int64_t page_size, int64_t first_page,
                    const std::optional<at::Tensor>& seq_lens, const char* op) {
  TORCH_CHECK(keys.size(3) <= kGpuMaxDim, "memops.", op, ": the CUDA kernel supports head dims "
              "D <= ", kGpuMaxDim, ", got ", keys.size(3), "; run this step on the CPU");
  const int64_t pages = ceil_div(keys.size(2), page_size);
  if (first_page >= pages) return;
  at::Tensor lens_holder;
  PrepareMemoryInt8Params p{};
  p.keys = keys.const_data_ptr();
  p.codes = codes.mutable_data_ptr<int8_t>();
  p.scales = scales.mutable_data_ptr<float>();
  p.seq_lens = optional_int_data(seq_lens, lens_holder);
  p.batch = keys.size(0);
  p.heads = keys.size(1);
  p.tokens = keys.size(2);
  p.dim = keys.size(3);
  p.page_size = page_size;
  p.first_page = first_page;
  p.num_pages = pages;
  for (int i = 0; i < 3; ++i) p.key_stride[i] = keys.stride(i);
  for (int i = 0; i < 4; ++i) p.code_stride[i] = codes.stride(i);
  for (int i = 0; i < 3; ++i) p.scale_stride[i] = scales.stride(i);
  check_launch(cuda::launch_prepare_memory_int8(p, element_type(keys), grid_limit(16),
                                                 current_stream()),
               op);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prepare_memory_int8_cuda(
    const at::Tensor& keys, int64_t page_size, const std::optional<at::Tensor>& seq_lens) {
  check_prepare_memory_int8(keys, page_size, seq_lens);
  const c10::cuda::CUDAGuard guard(keys.device());
  auto [codes, scales] = new_int8_summary(keys, page_size);
  quantise_pages(keys, codes, scales, page_size, 0, seq_lens, "prepare_memory_int8");
  return {codes, scales};
}

void prepare_memory_int8_inplace_cuda(at::Tensor& codes, at::Tensor& scales,
                                      const at::Tensor& keys, int64_t page_size,
                                      int64_t first_page,
                                      const std::optional<at::Tensor>& seq_lens) {
  check_prepare_memory_int8_inplace(codes, scales, keys, page_size, first_page, seq_lens);
  const c10::cuda::CUDAGuard guard(keys.device());
  quantise_pages(keys, codes, scales, page_size, first_page, seq_lens, "prepare_memory_int8_");
}

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
  m.impl("prepare_memory_int8", &prepare_memory_int8_cuda);
  m.impl("prepare_memory_int8_", &prepare_memory_int8_inplace_cuda);
}

}  // namespace memops
