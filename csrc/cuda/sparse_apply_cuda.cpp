#include <torch/library.h>

#include <cmath>

#include "cuda/cuda_common.h"
#include "cuda/op_params.h"
#include "validate.h"

namespace memops {

SparseApplyParams sparse_apply_params(const at::Tensor& query, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const int32_t* indices,
                                      int64_t index_heads, int64_t slots, const int32_t* seq_lens,
                                      at::Tensor& out, at::Tensor& lse, int64_t page_size,
                                      std::optional<double> scale) {
  SparseApplyParams p{};
  p.query = query.const_data_ptr();
  p.k_cache = k_cache.const_data_ptr();
  p.v_cache = v_cache.const_data_ptr();
  p.indices = indices;
  p.seq_lens = seq_lens;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.batch = query.size(0);
  p.q_heads = query.size(1);
  p.kv_heads = k_cache.size(1);
  p.tokens = k_cache.size(2);
  p.dim = query.size(2);
  p.page_size = page_size;
  p.index_heads = index_heads;
  p.slots = slots;
  for (int i = 0; i < 2; ++i) p.query_stride[i] = query.stride(i);
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = k_cache.stride(i);
    p.v_stride[i] = v_cache.stride(i);
  }
  p.value_errors = value_error_word_ptr();
  p.scale = scale.has_value() ? static_cast<float>(*scale)
                              : 1.f / std::sqrt(static_cast<float>(p.dim));
  return p;
}

at::Tensor attach_split_partials(SparseApplyParams& p, const at::Tensor& query) {
  const int64_t entries = p.batch * p.q_heads * p.splits;
  at::Tensor partials = at::empty({entries * (p.dim + 2)}, query.options().dtype(at::kFloat));
  p.partial_acc = partials.mutable_data_ptr<float>();
  p.partial_max = p.partial_acc + entries * p.dim;
  p.partial_sum = p.partial_max + entries;
  return partials;
}

std::tuple<at::Tensor, at::Tensor> sparse_apply_cuda(const at::Tensor& query,
                                                     const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache,
                                                     const std::optional<at::Tensor>& indices,
                                                     int64_t page_size,
                                                     const std::optional<at::Tensor>& seq_lens,
                                                     std::optional<double> scale) {
  check_sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens, scale);
  TORCH_CHECK(query.size(2) <= kGpuMaxDim, "memops.sparse_apply: the CUDA kernel "
              "supports head dims D <= ", kGpuMaxDim, ", got ", query.size(2),
              "; run this step on the CPU");
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = Hq / Hkv;
  if (value_checks_now()) {
    check_seq_lens_values("sparse_apply", seq_lens, S);
    if (indices.has_value())
      check_indices_values("sparse_apply", *indices, ceil_div(S, page_size));
  }
  at::Tensor out = at::empty({B, Hq, D}, query.options());
  at::Tensor lse = at::empty({B, Hq}, query.options().dtype(at::kFloat));
  if (B * Hq == 0) return {out, lse};
  at::Tensor idx, lens_holder;
  if (indices.has_value()) idx = indices->contiguous();

  SparseApplyParams p = sparse_apply_params(
      query, k_cache, v_cache, idx.defined() ? idx.const_data_ptr<int32_t>() : nullptr,
      idx.defined() ? idx.size(1) : Hkv, idx.defined() ? idx.size(2) : ceil_div(S, page_size),
      optional_int_data(seq_lens, lens_holder), out, lse, page_size, scale);
  const bool vectorized = allows_vector(query) && allows_vector(k_cache) &&
                          allows_vector(v_cache);
  const bool tensor_cores = tensor_cores_available() &&
                            sparse_apply_tc_supported(p, vectorized, query.scalar_type() != at::kFloat);
  const int64_t row_heads = p.index_heads != Hkv ? 1 : G;
  const int max_heads = row_heads == 1 ? 1 : (row_heads <= 4 ? 4 : 8);
  if (tensor_cores)
    plan_sparse_apply_tc(p, grid_limit(apply_blocks_per_sm()));
  else
    plan_sparse_apply(p, max_heads, grid_limit(2));
  TORCH_CHECK(B * p.index_heads * p.head_chunks <= 65535, "memops.sparse_apply: the CUDA "
              "kernel supports at most 65535 (batch, head) rows, got ",
              B * p.index_heads * p.head_chunks);
  // The splits are merged by a kernel of their own; MEMOPS_CUDA_FUSED_MERGE=1 merges them in
  // each row's last split block instead (one split: its block writes the output), which the H200
  // measured slower (the last block merges the whole row alone). Partials and the per-row
  // counters (zeroed here, a memset) are sized by shapes only, so the op stays capturable in a
  // CUDA graph; nothing is kept between calls.
  p.separate_merge = !env_opt_in("MEMOPS_CUDA_FUSED_MERGE");
  at::Tensor partials, split_done;
  if (p.splits > 1 || p.separate_merge) partials = attach_split_partials(p, query);
  if (p.splits > 1 && !p.separate_merge) {
    split_done = at::zeros({B * p.index_heads * p.head_chunks}, query.options().dtype(at::kInt));
    p.split_done = split_done.mutable_data_ptr<int32_t>();
  }
  check_launch(tensor_cores ? cuda::launch_sparse_apply_tc(p, element_type(query),
                                                           current_stream())
                            : cuda::launch_sparse_apply(p, element_type(query), vectorized,
                                                        max_heads, current_stream()),
               "sparse_apply");
  return {out, lse};
}

TORCH_LIBRARY_IMPL(memops, CUDA, m) { m.impl("sparse_apply", &sparse_apply_cuda); }

}  // namespace memops
