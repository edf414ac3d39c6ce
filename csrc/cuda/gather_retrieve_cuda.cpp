#include <torch/library.h>

#include "cuda/cuda_common.h"
#include "validate.h"

namespace memops {
namespace {

// Whether copies of `u` bytes divide the row and every byte stride and address.
bool unit_fits(const GatherRetrieveParams& p, int64_t u) {
  if (p.row_bytes % u != 0) return false;
  if (reinterpret_cast<std::uintptr_t>(p.memory) % u != 0 ||
      reinterpret_cast<std::uintptr_t>(p.out) % u != 0)
    return false;
  for (int64_t s : p.memory_stride)
    if (s % u != 0) return false;
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_retrieve_cuda(const at::Tensor& memory,
                                                        const at::Tensor& indices,
                                                        int64_t page_size,
                                                        const std::optional<at::Tensor>& seq_lens) {
  check_gather_retrieve(memory, indices, page_size, seq_lens);
  const c10::cuda::CUDAGuard guard(memory.device());
  const int64_t B = memory.size(0), H = memory.size(1), S = memory.size(2), D = memory.size(3);
  const int64_t k = indices.size(2);
  if (value_checks_now()) {
    check_indices_values("gather_retrieve", indices, ceil_div(S, page_size));
    check_seq_lens_values("gather_retrieve", seq_lens, S);
  }
  at::Tensor out = at::empty({B, H, k * page_size, D}, memory.options());
  at::Tensor lengths = at::empty({B, H}, indices.options());
  if (B * H == 0) return {out, lengths};
  const at::Tensor idx = indices.contiguous();
  at::Tensor lens_holder;
  GatherRetrieveParams p{};
  p.memory = static_cast<const char*>(memory.const_data_ptr());
  p.indices = idx.const_data_ptr<int32_t>();
  p.seq_lens = optional_int_data(seq_lens, lens_holder);
  p.out = static_cast<char*>(out.mutable_data_ptr());
  p.lengths = lengths.mutable_data_ptr<int32_t>();
  p.batch = B;
  p.heads = H;
  p.tokens = S;
  p.row_bytes = D * memory.element_size();
  p.page_size = page_size;
  p.k = k;
  for (int i = 0; i < 3; ++i) p.memory_stride[i] = memory.stride(i) * memory.element_size();
  p.value_errors = value_error_word_ptr();
  int unit = 16;
  while (unit > 1 && !unit_fits(p, unit)) unit /= 2;
  check_launch(cuda::launch_gather_retrieve(p, unit, grid_limit(16), current_stream()),
               "gather_retrieve");
  return {out, lengths};
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) { m.impl("gather_retrieve", &gather_retrieve_cuda); }

}  // namespace memops
