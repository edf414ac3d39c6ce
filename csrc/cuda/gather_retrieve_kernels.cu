#include "cuda/kernels_common.cuh"
#include "memops/gather_retrieve.cuh"

namespace memops {
namespace cuda {

cudaError_t launch_gather_retrieve(const GatherRetrieveParams& p, int unit_bytes, int max_blocks,
                                   cudaStream_t stream) {
  switch (unit_bytes) {
    case 16:
      return memops::launch_gather_retrieve<uint4>(p, max_blocks, stream);
    case 8:
      return memops::launch_gather_retrieve<uint2>(p, max_blocks, stream);
    case 4:
      return memops::launch_gather_retrieve<uint32_t>(p, max_blocks, stream);
    case 2:
      return memops::launch_gather_retrieve<uint16_t>(p, max_blocks, stream);
    default:
      return memops::launch_gather_retrieve<unsigned char>(p, max_blocks, stream);
  }
}

}  // namespace cuda
}  // namespace memops
