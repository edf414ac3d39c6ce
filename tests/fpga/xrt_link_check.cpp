// Built by tests/test_fpga_xrt_build.py against the runtime sources with MEMOPS_WITH_XRT and
// libxrt_coreutil: proves the native XRT path compiles and links, then exercises the emulation
// runtime without torch (the same sources the extension uses). Prints "ok" and exits 0, or
// prints what failed and exits 1.
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "fpga/xrt_runtime.h"

using namespace memops::fpga;

namespace {

int failures = 0;

void expect(bool condition, const char* what) {
  if (!condition) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  expect(native_runtime_built(), "built with MEMOPS_WITH_XRT");
  expect(native_device_count() >= 0, "device enumeration");
  std::printf("XRT devices: %d\n", native_device_count());

  auto emulation = make_emulation_runtime();
  const size_t bytes = 4096;
  auto source = emulation->allocate(bytes, 0, BufferKind::kNormal);
  auto target = emulation->allocate(bytes, 31, BufferKind::kNormal);
  std::vector<char> pattern(bytes);
  for (size_t i = 0; i < bytes; ++i) pattern[i] = static_cast<char>(i * 7 + 1);

  // Forgetting the sync to the device: the device-side copy moves stale bytes.
  std::memcpy(source->map(), pattern.data(), bytes);
  emulation->copy(*target, 0, *source, 0, bytes);
  target->sync(SyncDirection::kFromDevice, bytes, 0);
  expect(std::memcmp(target->map(), pattern.data(), bytes) != 0, "unsynced data stays stale");

  source->sync(SyncDirection::kToDevice, bytes, 0);
  emulation->copy(*target, 0, *source, 0, bytes);
  expect(std::memcmp(target->map(), pattern.data(), bytes) != 0,
         "device data is not visible on the host before sync");
  target->sync(SyncDirection::kFromDevice, bytes, 0);
  expect(std::memcmp(target->map(), pattern.data(), bytes) == 0, "synced data arrives");

  auto device_only = emulation->allocate(bytes, 2, BufferKind::kDeviceOnly);
  bool refused = false;
  try {
    device_only->map();
  } catch (const std::runtime_error&) {
    refused = true;
  }
  expect(refused, "device-only buffer refuses map()");

  bool bank_refused = false;
  try {
    emulation->allocate(bytes, kHbmBanks, BufferKind::kNormal);
  } catch (const std::runtime_error&) {
    bank_refused = true;
  }
  expect(bank_refused, "bank 32 refused");

  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
