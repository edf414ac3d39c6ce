#include "cuda/kernels_common.cuh"
#include "memops/topk_sparse_apply_tc.cuh"

namespace memops {
namespace cuda {

cudaError_t launch_topk_sparse_apply_tc(const TopkApplyParams& p, ElementType type,
                                        int resident_blocks, cudaStream_t stream) {
  if (type == ElementType::kBFloat16)
    return memops::launch_topk_sparse_apply_tc<gpu::BFloat16>(p, resident_blocks, stream);
  if (type == ElementType::kFloat16)
    return memops::launch_topk_sparse_apply_tc<gpu::Half>(p, resident_blocks, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace memops
