#include <torch/library.h>

#include "cuda/cuda_common.h"
#include "validate.h"

namespace memops {

std::tuple<at::Tensor, at::Tensor> merge_attention_cuda(const at::Tensor& out_a,
                                                        const at::Tensor& lse_a,
                                                        const at::Tensor& out_b,
                                                        const at::Tensor& lse_b) {
  check_merge_attention(out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  const at::Tensor a = out_a.contiguous(), b = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  MergeAttentionParams p{};
  p.out_a = a.const_data_ptr();
  p.out_b = b.const_data_ptr();
  p.lse_a = la.const_data_ptr<float>();
  p.lse_b = lb.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.rows = lse_a.numel();
  p.dim = out_a.size(-1);
  check_launch(cuda::launch_merge_attention(p, element_type(out_a), grid_limit(16),
                                            current_stream()),
               "merge_attention");
  return {out, lse};
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) { m.impl("merge_attention", &merge_attention_cuda); }

}  // namespace memops
