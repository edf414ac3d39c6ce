// The per-device value-error word of the CUDA kernels (cuda_common.h, gpu_params.h).
#include <c10/core/InferenceMode.h>

#include <array>
#include <mutex>

#include "cuda/cuda_common.h"
#include "validate.h"

namespace memops {
namespace {

constexpr int kMaxDevices = 64;
std::mutex word_mutex;
// Never freed: tensors held past interpreter shutdown must not run their destructors after the
// CUDA runtime has gone, so each is a heap object kept for the process.
std::array<at::Tensor*, kMaxDevices> words{};

at::Tensor* word_of(int device, bool may_allocate) {
  if (device < 0 || device >= kMaxDevices) return nullptr;
  const std::lock_guard<std::mutex> lock(word_mutex);
  if (words[device] == nullptr && may_allocate) {
    const c10::InferenceMode normal_tensor(false);  // clearable from Python in any mode
    words[device] = new at::Tensor(at::zeros(
        {1}, at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, device))));
  }
  return words[device];
}

at::Tensor value_error_word_cuda(int64_t device_index) {
  TORCH_CHECK_VALUE(device_index >= 0 && device_index < c10::cuda::device_count(),
                    "memops.value_errors: `device` must be a CUDA device index in [0, ",
                    static_cast<int64_t>(c10::cuda::device_count()), "), got ", device_index);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  TORCH_CHECK(!capturing || word_of(static_cast<int>(device_index), false) != nullptr,
              "memops.value_errors: read the value-error word once before capturing a CUDA "
              "graph (it is allocated on first use)");
  return *word_of(static_cast<int>(device_index), !capturing);
}

const bool registered = (register_cuda_value_error_word(&value_error_word_cuda), true);

}  // namespace

int32_t* value_error_word_ptr() {
  const int device = c10::cuda::current_device();
  at::Tensor* word = word_of(device, false);
  if (word == nullptr &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None)
    word = word_of(device, true);
  return word == nullptr ? nullptr : word->mutable_data_ptr<int32_t>();
}

}  // namespace memops
