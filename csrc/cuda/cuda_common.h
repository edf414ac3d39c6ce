// Helpers shared by the CUDA bindings (host compiler): current stream, element type of a tensor,
// launch-error checks, and whether a tensor's layout allows 16-byte accesses.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#include "cuda/launch.h"
#include "validate.h"

namespace memops {

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "memops.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(e));
}

// The validators admit float32, float16 and bfloat16 only.
inline cuda::ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::ElementType::kFloat16;
    case at::kBFloat16:
      return cuda::ElementType::kBFloat16;
    default:
      return cuda::ElementType::kFloat32;
  }
}

inline const int32_t* optional_int_data(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = t->contiguous();
  return holder.const_data_ptr<int32_t>();
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Checked mode (torch_memops.set_value_checks) applies now: it is on and the current stream of
// the current device is not capturing a CUDA graph (the host copy of the values would break the
// capture, and a replay would not repeat the check). Call it under the op's device guard.
inline bool value_checks_now() {
  return value_checks_enabled() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// The value-error word of the current device (torch_memops.value_errors): one int32 that the
// kernels OR a bit into when they apply the out-of-range rule. Allocated (zeroed, on the
// current stream) by the first op on the device that runs outside a CUDA-graph capture, and kept
// for the process; nullptr before that (the kernels then record nothing).
int32_t* value_error_word_ptr();

// Blocks that keep every multiprocessor of the current device busy (grid-stride kernels, split
// planning). The count is read once per device: a host query, no synchronisation.
inline int grid_limit(int blocks_per_sm) {
  static std::array<std::atomic<int>, 64> counts{};
  const int device = c10::cuda::current_device();
  int sms = device < 64 ? counts[device].load() : 0;
  if (sms == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) ==
                    cudaSuccess,
                "memops: cannot read the multiprocessor count of CUDA device ", device);
    if (device < 64) counts[device].store(sms);
  }
  return sms * blocks_per_sm;
}

// Switches for benchmarks and bisection, read at every call (so a process can compare both
// paths). env_switch: unset or anything but "0" means on; env_opt_in: set and not "0" means on.
//   MEMOPS_CUDA_TENSOR_CORES=0   the portable CUDA-core kernels for every dtype
//   MEMOPS_CUDA_FUSED_SELECT=0   topk_relevancy selects in a kernel of its own
//   MEMOPS_CUDA_FUSED_STEP=1     topk_sparse_apply runs its one-launch kernel instead of
//                                topk_relevancy and sparse_apply (opt-in: slower on the H200,
//                                docs/cuda.md)
//   MEMOPS_CUDA_FUSED_MERGE=1    sparse_apply merges its splits in the split kernel's last block
//                                (opt-in: slower than the merge kernel on the H200, docs/cuda.md)
//   MEMOPS_CUDA_APPLY_BLOCKS=N   the tensor-core split plan aims at N blocks a multiprocessor
//                                (1..16, default 4: fewer, longer splits at N < 4)
inline bool env_switch(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::string(value) != "0";
}
inline bool env_opt_in(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) != "0";
}
inline int apply_blocks_per_sm() {
  const char* value = std::getenv("MEMOPS_CUDA_APPLY_BLOCKS");
  const int n = value == nullptr ? 0 : std::atoi(value);
  return n >= 1 && n <= 16 ? n : 4;
}

// The tensor-core kernels (mma.m16n8k16 with bf16, movmatrix) need sm_80 or newer. The
// capability is read once per device.
inline bool tensor_cores_available() {
  if (!env_switch("MEMOPS_CUDA_TENSOR_CORES")) return false;
  static std::array<std::atomic<int>, 64> majors{};
  const int device = c10::cuda::current_device();
  int major = device < 64 ? majors[device].load() : 0;
  if (major == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
                    cudaSuccess,
                "memops: cannot read the compute capability of CUDA device ", device);
    if (device < 64) majors[device].store(major);
  }
  return major >= 8;
}

// True when a tensor can be read 16 bytes at a time: data pointer aligned and every stride
// but the last a multiple of VEC (the last dim is contiguous and a multiple of VEC).
inline bool allows_vector(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  if (t.numel() == 0) return true;
  if (reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % (vec * t.element_size()) != 0)
    return false;
  if (t.size(-1) % vec != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  return true;
}


}  // namespace memops
