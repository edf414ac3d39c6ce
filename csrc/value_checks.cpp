// The checked mode of the device backends (torch_memops.set_value_checks): whether they copy
// seq_lens, num_pages and indices to the host and raise the CPU's error for out-of-range
// values. Off by default (the copy is a host sync); MEMOPS_VALUE_CHECKS=1 turns it on at load.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "validate.h"

namespace memops {
namespace {

bool env_value_checks() {
  const char* value = std::getenv("MEMOPS_VALUE_CHECKS");
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

std::atomic<bool>& value_checks_flag() {
  static std::atomic<bool> flag{env_value_checks()};
  return flag;
}

ValueErrorWordFn& cuda_value_error_word_fn() {
  static ValueErrorWordFn fn = nullptr;
  return fn;
}

at::Tensor value_error_word(int64_t device_index) {
  TORCH_CHECK(cuda_value_error_word_fn() != nullptr,
              "memops.value_errors: torch_memops was built without its CUDA kernels; only the "
              "CUDA backend records value errors (the CPU and fpga raise them)");
  return cuda_value_error_word_fn()(device_index);
}

}  // namespace

void register_cuda_value_error_word(ValueErrorWordFn fn) { cuda_value_error_word_fn() = fn; }

bool value_checks_enabled() { return value_checks_flag().load(std::memory_order_relaxed); }

void set_value_checks(bool enabled) {
  value_checks_flag().store(enabled, std::memory_order_relaxed);
}

TORCH_LIBRARY(memops_settings, m) {
  m.def("set_value_checks(bool enabled) -> ()", &set_value_checks);
  m.def("value_checks() -> bool", &value_checks_enabled);
  m.def("value_error_word(int device_index) -> Tensor", &value_error_word);
}

}  // namespace memops
