#include "cuda/kernels_common.cuh"
#include "memops/merge_attention.cuh"

namespace memops {
namespace cuda {

cudaError_t launch_merge_attention(const MergeAttentionParams& p, ElementType type,
                                   int max_blocks, cudaStream_t stream) {
  return dispatch_element_type(type, [&](auto element) {
    return memops::launch_merge_attention<decltype(element)>(p, max_blocks, stream);
  });
}

}  // namespace cuda
}  // namespace memops
