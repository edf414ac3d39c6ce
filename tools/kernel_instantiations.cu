// Instantiates every GPU kernel of csrc/include/memops/*.cuh for every element type with the
// toolkit's own 16-bit types and no torch headers. tools/hip_compile_check.sh compiles it with
// hipcc for AMD GPUs; nvcc compiles it too. It proves that the kernel sources are portable.
#include "memops/gather_retrieve.cuh"
#include "memops/int8_summary.cuh"
#include "memops/merge_attention.cuh"
#include "memops/prepare_memory.cuh"
#include "memops/sparse_apply.cuh"
#include "memops/topk_relevancy.cuh"
#if !defined(__HIPCC__)
// The tensor-core kernels are CUDA only (mma.cuh); HIP runs the portable kernels above.
#include "memops/int8_summary_tc.cuh"
#include "memops/sparse_apply_tc.cuh"
#include "memops/topk_relevancy_tc.cuh"
#include "memops/topk_sparse_apply_tc.cuh"
#endif

namespace memops {

// Counts launches that report an error (all of them when no GPU is present); the count is
// returned so that nothing is discarded.
template <typename T, int VEC>
int instantiate_per_type() {
  gpu::Stream stream{};
  int failed = 0;
  failed += launch_prepare_memory<T, VEC>(PrepareMemoryParams{}, 1, stream) != gpu::kSuccess;
  failed += launch_relevancy_scores<T, VEC>(RelevancyParams{}, 1, stream) != gpu::kSuccess;
  failed += launch_sparse_apply<T, VEC, 1>(SparseApplyParams{}, stream) != gpu::kSuccess;
  failed += launch_sparse_apply<T, VEC, 4>(SparseApplyParams{}, stream) != gpu::kSuccess;
  failed += launch_sparse_apply<T, VEC, 8>(SparseApplyParams{}, stream) != gpu::kSuccess;
  if (VEC == 1) {  // the int8 summaries: keys / query of type T, every code width
    failed += launch_prepare_memory_int8<T>(PrepareMemoryInt8Params{}, 1, stream) != gpu::kSuccess;
    for (const bool vectorized : {false, true})
      for (const int64_t dim : {64, 256}) {
        RelevancyInt8Params p{};
        p.batch = 1;
        p.kv_heads = 1;
        p.pages = 1;
        p.dim = dim;
        for (int* done : {static_cast<int*>(nullptr), &failed})
          failed += launch_relevancy_scores_int8<T>(p, SelectParams{}, done, vectorized, 1,
                                                    stream) != gpu::kSuccess;
      }
  }
  return failed;
}

template <typename T>
int instantiate_all_widths() {
  int failed = instantiate_per_type<T, 16 / sizeof(T)>() + instantiate_per_type<T, 1>();
  failed +=
      launch_merge_attention<T>(MergeAttentionParams{}, 1, gpu::Stream{}) != gpu::kSuccess;
  return failed;
}

#if !defined(__HIPCC__)
template <typename T>
int instantiate_tensor_core() {
  const gpu::Stream stream{};
  int failed = launch_sparse_apply_tc<T>(SparseApplyParams{}, stream) != gpu::kSuccess;
  for (const int64_t dim : {64, 128}) {
    for (const RelevancyMode mode :
         {RelevancyMode::kBound, RelevancyMode::kDot, RelevancyMode::kIndexer}) {
      for (const int64_t reps : {1, 2}) {
        RelevancyParams p{};
        p.batch = 1;
        p.kv_heads = 1;
        p.dim = dim;
        p.mode = mode;
        p.reps = reps;
        failed += launch_relevancy_tc<T>(p, SelectParams{}, nullptr, 1, stream) != gpu::kSuccess;
      }
    }
    RelevancyInt8Params ip{};
    ip.batch = 1;
    ip.q_heads = 4;
    ip.kv_heads = 1;
    ip.pages = 1;
    ip.dim = dim;
    failed += launch_relevancy_int8_tc<T>(ip, SelectParams{}, nullptr, 1, stream) != gpu::kSuccess;
    for (const RelevancyMode mode : {RelevancyMode::kBound, RelevancyMode::kDot}) {
      for (const int64_t reps : {1, 2}) {
        TopkApplyParams sp{};
        sp.relevancy.batch = 1;
        sp.relevancy.kv_heads = 1;
        sp.relevancy.dim = dim;
        sp.relevancy.mode = mode;
        sp.relevancy.reps = reps;
        sp.apply.splits = 1;
        failed += launch_topk_sparse_apply_tc<T>(sp, 1, stream) != gpu::kSuccess;
      }
    }
  }
  return failed;
}
#endif

int instantiate_all() {
  int failed = instantiate_all_widths<float>() + instantiate_all_widths<gpu::Half>() +
               instantiate_all_widths<gpu::BFloat16>();
  const gpu::Stream stream{};
  failed += launch_select_topk(SelectParams{}, 0, stream) != gpu::kSuccess;
  failed += launch_gather_retrieve<unsigned char>(GatherRetrieveParams{}, 1, stream) !=
            gpu::kSuccess;
  failed += launch_gather_retrieve<uint4>(GatherRetrieveParams{}, 1, stream) != gpu::kSuccess;
#if !defined(__HIPCC__)
  failed += instantiate_tensor_core<gpu::Half>() + instantiate_tensor_core<gpu::BFloat16>();
#endif
  return failed;
}

}  // namespace memops

int main() { return memops::instantiate_all() >= 0 ? 0 : 1; }
