#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/cpu_common.h"
#include "validate.h"

namespace memops {

std::tuple<at::Tensor, at::Tensor> gather_retrieve_cpu(const at::Tensor& memory,
                                                       const at::Tensor& indices,
                                                       int64_t page_size,
                                                       const std::optional<at::Tensor>& seq_lens) {
  check_gather_retrieve(memory, indices, page_size, seq_lens);
  const int64_t B = memory.size(0), H = memory.size(1), S = memory.size(2), D = memory.size(3);
  const int64_t k = indices.size(2), P = page_size;
  check_indices_values("gather_retrieve", indices, ceil_div(S, P));
  check_seq_lens_values("gather_retrieve", seq_lens, S);
  at::Tensor out = at::empty({B, H, k * P, D}, memory.options());
  at::Tensor lengths = at::empty({B, H}, indices.options());
  at::Tensor lens_holder;
  const int32_t* lens = optional_int_ptr(seq_lens, lens_holder);
  const at::Tensor idx = indices.contiguous();
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  // Byte copies: bit-exact for every dtype.
  const int64_t elem = memory.element_size(), row_bytes = D * elem;
  const char* src = static_cast<const char*>(memory.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  int32_t* lp = lengths.mutable_data_ptr<int32_t>();
  const auto ms = memory.strides();
  at::parallel_for(0, B * H, grain_for(k * P * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H, length = row_length(lens, b, S);
      int64_t copied = 0;
      char* row_out = dst + r * k * P * row_bytes;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t page = ip[r * k + j];
        const int64_t n = page < 0 ? 0 : page_valid_tokens(page, P, length);
        char* slot = row_out + j * P * row_bytes;
        if (n > 0) {  // padding (-1) has no source address
          const char* first = src + (b * ms[0] + h * ms[1] + page * P * ms[2]) * elem;
          for (int64_t t = 0; t < n; ++t)
            std::memcpy(slot + t * row_bytes, first + t * ms[2] * elem, row_bytes);
        }
        std::memset(slot + n * row_bytes, 0, (P - n) * row_bytes);
        copied += n;
      }
      lp[r] = static_cast<int32_t>(copied);
    }
  });
  return {out, lengths};
}

TORCH_LIBRARY_IMPL(memops, CPU, m) { m.impl("gather_retrieve", &gather_retrieve_cpu); }

}  // namespace memops
