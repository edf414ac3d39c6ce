#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "memops/attention.h"
#include "validate.h"

namespace memops {

std::tuple<at::Tensor, at::Tensor> merge_attention_cpu(const at::Tensor& out_a,
                                                       const at::Tensor& lse_a,
                                                       const at::Tensor& out_b,
                                                       const at::Tensor& lse_b) {
  check_merge_attention(out_a, lse_a, out_b, lse_b);
  const at::Tensor a = out_a.contiguous(), b = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  const int64_t D = out_a.size(-1), rows = lse_a.numel();
  MEMOPS_DISPATCH_FLOAT(out_a.scalar_type(), "merge_attention_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const float* lap = la.const_data_ptr<float>();
    const float* lbp = lb.const_data_ptr<float>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* lp = lse.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float wa, wb;
        merge_weights(lap[r], lbp[r], wa, wb, lp[r]);
        for (int64_t d = 0; d < D; ++d)
          op[r * D + d] = from_float<scalar_t>(wa * to_float(ap[r * D + d]) +
                                               wb * to_float(bp[r * D + d]));
      }
    });
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(memops, CPU, m) { m.impl("merge_attention", &merge_attention_cpu); }

}  // namespace memops
