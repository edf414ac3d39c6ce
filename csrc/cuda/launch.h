// Launchers of the CUDA kernels, compiled by nvcc in <op>_kernels.cu without torch, called by the
// bindings (<op>_cuda.cpp, host compiler). They return the launch status and never throw, so no
// C++ exception crosses a frame that nvcc compiled; the bindings own every check and error.
#pragma once

#include <cuda_runtime_api.h>

#include "memops/gpu_params.h"
#include "memops/int8_params.h"

namespace memops {
namespace cuda {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// `vectorized`: every tensor the kernel reads in 16-byte accesses allows them (alignment and
// strides); otherwise the element-wise instantiation runs.
cudaError_t launch_prepare_memory(const PrepareMemoryParams& p, ElementType type, bool vectorized,
                                  int max_blocks, cudaStream_t stream);
cudaError_t launch_topk_relevancy(const RelevancyParams& scores, const SelectParams& select,
                                  ElementType type, bool vectorized, int target_blocks,
                                  cudaStream_t stream);
// `max_heads`: 1, 4 or 8, the query heads one block serves (plan_sparse_apply used the same).
cudaError_t launch_sparse_apply(const SparseApplyParams& p, ElementType type, bool vectorized,
                                int max_heads, cudaStream_t stream);
// Tensor-core paths (sm_80+, 16-bit types; the bindings check relevancy_tc_supported /
// sparse_apply_tc_supported and the device). `done`: rows zeroed ints to fuse the selection into
// the scoring kernel, or nullptr for the separate selection kernel.
cudaError_t launch_topk_relevancy_tc(const RelevancyParams& scores, const SelectParams& select,
                                     ElementType type, int* done, int resident_blocks,
                                     cudaStream_t stream);
cudaError_t launch_sparse_apply_tc(const SparseApplyParams& p, ElementType type,
                                   cudaStream_t stream);
// The decode step in one launch (topk_sparse_apply_tc.cuh): `p` planned by
// plan_topk_sparse_apply_tc, accepted by topk_sparse_apply_tc_supported, its counters zeroed;
// `resident_blocks`: two a multiprocessor.
cudaError_t launch_topk_sparse_apply_tc(const TopkApplyParams& p, ElementType type,
                                        int resident_blocks, cudaStream_t stream);
// The int8 summaries (int8_summary.cuh, int8_summary_tc.cuh): `type` is the keys' (prepare) or
// the query's (scoring) element type; scoring writes float32 scores and selects as the 16-bit
// paths do (`done`: rows zeroed ints for the fused selection, or nullptr for the separate
// selection kernel). The tensor-core variant needs int8_tc_supported and sm_80+.
cudaError_t launch_prepare_memory_int8(const PrepareMemoryInt8Params& p, ElementType type,
                                       int max_blocks, cudaStream_t stream);
cudaError_t launch_topk_relevancy_int8(const RelevancyInt8Params& scores,
                                       const SelectParams& select, ElementType type,
                                       bool vectorized, int* done, int target_blocks,
                                       cudaStream_t stream);
cudaError_t launch_topk_relevancy_int8_tc(const RelevancyInt8Params& scores,
                                          const SelectParams& select, ElementType type, int* done,
                                          int resident_blocks, cudaStream_t stream);
cudaError_t launch_merge_attention(const MergeAttentionParams& p, ElementType type,
                                   int max_blocks, cudaStream_t stream);
// `unit_bytes`: 16, 8, 4, 2 or 1, the widest copy the row size, strides and addresses allow.
cudaError_t launch_gather_retrieve(const GatherRetrieveParams& p, int unit_bytes, int max_blocks,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace memops
