#include "cuda/kernels_common.cuh"
#include "memops/prepare_memory.cuh"
#include "memops/int8_summary.cuh"

namespace memops {
namespace cuda {

cudaError_t launch_prepare_memory(const PrepareMemoryParams& p, ElementType type, bool vectorized,
                                  int max_blocks, cudaStream_t stream) {
  return dispatch_element_type(type, [&](auto element) {
    using T = decltype(element);
    return vectorized ? memops::launch_prepare_memory<T, 16 / sizeof(T)>(p, max_blocks, stream)
                      : memops::launch_prepare_memory<T, 1>(p, max_blocks, stream);
  });
}

cudaError_t launch_prepare_memory_int8(const PrepareMemoryInt8Params& p, ElementType type,
                                       int max_blocks, cudaStream_t stream) {
  return dispatch_element_type(type, [&](auto element) {
    using T = decltype(element);
    return memops::launch_prepare_memory_int8<T>(p, max_blocks, stream);
  });
}

}  // namespace cuda
}  // namespace memops
