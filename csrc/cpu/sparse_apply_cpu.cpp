#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "memops/attention.h"
#include "validate.h"

namespace memops {
namespace {

// <a, b> over n floats in sixteen lanes (two f32x8), then the lanes and the tail.
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  f32x8 acc0 = {}, acc1 = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 += load8(a + d) * load8(b + d);
    acc1 += load8(a + d + 8) * load8(b + d + 8);
  }
  float tail = 0.f;
  for (; d < n; ++d) tail += a[d] * b[d];
  const f32x8 s = acc0 + acc1;
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// One token for every head of a task: its key and value rows as floats (`key`, `value`: D
// floats of scratch), then per head the online-softmax step of attention.h.
template <typename T>
MEMOPS_CPU_MULTIVERSION void attend_token(const T* kt, const T* vt, const float* q, int64_t heads,
                                          int64_t D, float scale, float* key, float* value,
                                          SoftmaxState* state, float* acc) {
  for (int64_t d = 0; d < D; ++d) key[d] = to_float(kt[d]);
  for (int64_t d = 0; d < D; ++d) value[d] = to_float(vt[d]);
  for (int64_t h = 0; h < heads; ++h) {
    float p;
    const float rescale = softmax_push(state[h], scale * dot_lanes(q + h * D, key, D), p);
    float* a = acc + h * D;
    for (int64_t d = 0; d < D; ++d) a[d] = a[d] * rescale + p * value[d];
  }
}

// One task is a group of query heads that read the same tokens: the whole GQA group of a kv head
// (indices per kv head, or dense), or a single head (indices per query head). Each key and value
// row is converted to float once and used by every head of the group; per head, the online
// softmax of attention.h runs token by token, with the dot product and the accumulator update
// vectorised over the head dim.
template <typename T>
void attend_rows(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const int32_t* indices, int64_t index_heads, int64_t k, int64_t page_size,
                 const int32_t* lens, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = Hq / Hkv;
  const int64_t heads = indices != nullptr && index_heads == Hq ? 1 : G;  // per task
  const T* qp = query.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = query.strides(), ks = k_cache.strides(), vs = v_cache.strides();
  at::parallel_for(0, B * Hq / heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(heads * D), acc(heads * D), key(D), value(D);
    std::vector<SoftmaxState> state(heads);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hq / heads), h0 = task % (Hq / heads) * heads, kv = h0 / G;
      const int64_t length = row_length(lens, b, S);
      const T* kbase = kp + b * ks[0] + kv * ks[1];
      const T* vbase = vp + b * vs[0] + kv * vs[1];
      for (int64_t h = 0; h < heads; ++h) {
        const T* qh = qp + b * qs[0] + (h0 + h) * qs[1];
        for (int64_t d = 0; d < D; ++d) q[h * D + d] = to_float(qh[d]);
        state[h] = SoftmaxState{};
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const auto attend_page = [&](int64_t first, int64_t n) {
        for (int64_t t = first; t < first + n; ++t)
          attend_token(kbase + t * ks[2], vbase + t * vs[2], q.data(), heads, D, scale,
                       key.data(), value.data(), state.data(), acc.data());
      };
      if (indices == nullptr) {
        attend_page(0, length);
      } else {
        const int32_t* row = indices + (b * index_heads + (index_heads == Hq ? h0 : kv)) * k;
        for (int64_t j = 0; j < k; ++j)
          if (row[j] >= 0)
            attend_page(row[j] * page_size, page_valid_tokens(row[j], page_size, length));
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float inv = state[h].l > 0.f ? 1.f / state[h].l : 0.f;
        T* o = op + (b * Hq + h0 + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[h * D + d] * inv);
        lp[b * Hq + h0 + h] = softmax_lse(state[h]);
      }
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
  check_sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens, scale);
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
