#include "cuda/kernels_common.cuh"
#include "memops/topk_relevancy.cuh"
#include "memops/topk_relevancy_tc.cuh"
#include "memops/int8_summary.cuh"
#include "memops/int8_summary_tc.cuh"

namespace memops {
namespace cuda {

cudaError_t launch_topk_relevancy(const RelevancyParams& scores, const SelectParams& select,
                                  ElementType type, bool vectorized, int target_blocks,
                                  cudaStream_t stream) {
  const cudaError_t e = dispatch_element_type(type, [&](auto element) {
    using T = decltype(element);
    return vectorized
               ? memops::launch_relevancy_scores<T, 16 / sizeof(T)>(scores, target_blocks, stream)
               : memops::launch_relevancy_scores<T, 1>(scores, target_blocks, stream);
  });
  if (e != cudaSuccess) return e;
  return memops::launch_select_topk(select, scores.batch * scores.kv_heads, stream);
}

cudaError_t launch_topk_relevancy_tc(const RelevancyParams& scores, const SelectParams& select,
                                     ElementType type, int* done, int resident_blocks,
                                     cudaStream_t stream) {
  cudaError_t e = cudaErrorInvalidValue;
  if (type == ElementType::kBFloat16)
    e = memops::launch_relevancy_tc<gpu::BFloat16>(scores, select, done, resident_blocks, stream);
  if (type == ElementType::kFloat16)
    e = memops::launch_relevancy_tc<gpu::Half>(scores, select, done, resident_blocks, stream);
  if (e != cudaSuccess || done != nullptr) return e;
  return memops::launch_select_topk(select, scores.batch * scores.kv_heads, stream);
}

cudaError_t launch_topk_relevancy_int8(const RelevancyInt8Params& scores,
                                       const SelectParams& select, ElementType type,
                                       bool vectorized, int* done, int target_blocks,
                                       cudaStream_t stream) {
  const cudaError_t e = dispatch_element_type(type, [&](auto element) {
    using Q = decltype(element);
    return memops::launch_relevancy_scores_int8<Q>(scores, select, done, vectorized,
                                                   target_blocks, stream);
  });
  if (e != cudaSuccess || done != nullptr) return e;
  return memops::launch_select_topk(select, scores.batch * scores.kv_heads, stream);
}

cudaError_t launch_topk_relevancy_int8_tc(const RelevancyInt8Params& scores,
                                          const SelectParams& select, ElementType type, int* done,
                                          int resident_blocks, cudaStream_t stream) {
  cudaError_t e = cudaErrorInvalidValue;
  if (type == ElementType::kBFloat16)
    e = memops::launch_relevancy_int8_tc<gpu::BFloat16>(scores, select, done, resident_blocks,
                                                        stream);
  if (type == ElementType::kFloat16)
    e = memops::launch_relevancy_int8_tc<gpu::Half>(scores, select, done, resident_blocks, stream);
  if (e != cudaSuccess || done != nullptr) return e;
  return memops::launch_select_topk(select, scores.batch * scores.kv_heads, stream);
}

}  // namespace cuda
}  // namespace memops
