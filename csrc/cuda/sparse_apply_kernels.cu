#include "cuda/kernels_common.cuh"
#include "memops/sparse_apply.cuh"
#include "memops/sparse_apply_tc.cuh"

namespace memops {
namespace cuda {
namespace {

template <typename T, int VEC>
cudaError_t launch_for_heads(const SparseApplyParams& p, int max_heads, cudaStream_t stream) {
  if (max_heads == 1) return memops::launch_sparse_apply<T, VEC, 1>(p, stream);
  if (max_heads == 4) return memops::launch_sparse_apply<T, VEC, 4>(p, stream);
  return memops::launch_sparse_apply<T, VEC, 8>(p, stream);
}

}  // namespace

cudaError_t launch_sparse_apply(const SparseApplyParams& p, ElementType type, bool vectorized,
                                int max_heads, cudaStream_t stream) {
  return dispatch_element_type(type, [&](auto element) {
    using T = decltype(element);
    return vectorized ? launch_for_heads<T, 16 / sizeof(T)>(p, max_heads, stream)
                      : launch_for_heads<T, 1>(p, max_heads, stream);
  });
}

cudaError_t launch_sparse_apply_tc(const SparseApplyParams& p, ElementType type,
                                   cudaStream_t stream) {
  if (type == ElementType::kBFloat16) return memops::launch_sparse_apply_tc<gpu::BFloat16>(p, stream);
  if (type == ElementType::kFloat16) return memops::launch_sparse_apply_tc<gpu::Half>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace memops
