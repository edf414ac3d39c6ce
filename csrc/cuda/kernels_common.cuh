// Element-type dispatch for the launchers in *_kernels.cu (no torch: the toolkit's own types).
#pragma once

#include "cuda/launch.h"
#include "memops/gpu_compat.h"

namespace memops {
namespace cuda {

// Calls fn(T{}) with T the storage type of `type`.
template <typename Fn>
cudaError_t dispatch_element_type(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kFloat32:
      return fn(float{});
    case ElementType::kFloat16:
      return fn(gpu::Half{});
    case ElementType::kBFloat16:
      return fn(gpu::BFloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace memops
