#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "memops/attention.h"
#include "memops/relevancy.h"
#include "validate.h"

namespace memops {
namespace {

// One (batch, query head) row: online softmax over the tokens of the selected pages.
template <typename T>
void attend_rows(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const int32_t* indices, int64_t index_heads, int64_t k, int64_t page_size,
                 const int32_t* lens, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = Hq / Hkv;
  const T* qp = query.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = query.strides(), ks = k_cache.strides(), vs = v_cache.strides();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Hq, h = r % Hq, kv = h / G, length = row_length(lens, b, S);
      const T* q = qp + b * qs[0] + h * qs[1];
      const T* kbase = kp + b * ks[0] + kv * ks[1];
      const T* vbase = vp + b * vs[0] + kv * vs[1];
      std::fill(acc.begin(), acc.end(), 0.f);
      SoftmaxState state;
      const auto attend_page = [&](int64_t first, int64_t n) {
        for (int64_t t = first; t < first + n; ++t) {
          float p;
          const float rescale = softmax_push(state, scale * dot(q, kbase + t * ks[2], D), p);
          const T* v = vbase + t * vs[2];
          for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * rescale + p * to_float(v[d]);
        }
      };
      if (indices == nullptr) {
        attend_page(0, length);
      } else {
        const int32_t* row = indices + (b * index_heads + (index_heads == Hq ? h : kv)) * k;
        for (int64_t j = 0; j < k; ++j)
          if (row[j] >= 0)
            attend_page(row[j] * page_size, page_valid_tokens(row[j], page_size, length));
      }
      const float inv = state.l > 0.f ? 1.f / state.l : 0.f;
      T* o = op + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] * inv);
      lp[r] = softmax_lse(state);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_apply_cpu(const at::Tensor& query,
                                                    const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const std::optional<at::Tensor>& indices,
                                                    int64_t page_size,
                                                    const std::optional<at::Tensor>& seq_lens,
                                                    std::optional<double> scale) {
  check_sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens);
  const int64_t S = k_cache.size(2);
  check_seq_lens_values("sparse_apply", seq_lens, S);
  if (indices.has_value()) check_indices_values("sparse_apply", *indices, ceil_div(S, page_size));
  const float softmax_scale = scale.has_value()
                                  ? static_cast<float>(*scale)
                                  : 1.f / std::sqrt(static_cast<float>(query.size(2)));
  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse = at::empty({query.size(0), query.size(1)}, query.options().dtype(at::kFloat));
  at::Tensor lens_holder, idx;
  const int32_t* lens = optional_int_ptr(seq_lens, lens_holder);
  if (indices.has_value()) idx = indices->contiguous();
  MEMOPS_DISPATCH_FLOAT(query.scalar_type(), "sparse_apply_cpu", [&] {
    attend_rows<scalar_t>(query, k_cache, v_cache,
                          idx.defined() ? idx.const_data_ptr<int32_t>() : nullptr,
                          idx.defined() ? idx.size(1) : 0, idx.defined() ? idx.size(2) : 0,
                          page_size, lens, softmax_scale, out, lse);
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(memops, CPU, m) { m.impl("sparse_apply", &sparse_apply_cpu); }

}  // namespace memops
