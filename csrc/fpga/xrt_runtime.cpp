// Choice of the runtime implementation and the checks shared by both.
#include "fpga/xrt_runtime.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace memops::fpga {

void check_bank(int bank) {
  if (bank < 0 || bank >= kHbmBanks)
    throw std::runtime_error("HBM bank " + std::to_string(bank) +
                             " does not exist: the Alveo U55C has " + std::to_string(kHbmBanks) +
                             " HBM pseudo-channels, banks 0 .. " +
                             std::to_string(kHbmBanks - 1));
}

void* BufferObject::map() {
  if (kind() == BufferKind::kDeviceOnly)
    throw std::runtime_error(
        "cannot map a device-only buffer object: it has no host copy (xrt::bo::flags::"
        "device_only); copy it into a normal buffer object on the device first");
  return map_host_copy();
}

void BufferObject::sync(SyncDirection direction, size_t bytes, size_t offset) {
  if (kind() == BufferKind::kDeviceOnly)
    throw std::runtime_error("cannot sync a device-only buffer object: it has no host copy");
  if (offset > size() || bytes > size() - offset)
    throw std::runtime_error("sync of bytes [" + std::to_string(offset) + ", " +
                             std::to_string(offset + bytes) + ") is outside the buffer of " +
                             std::to_string(size()) + " bytes");
  sync_range(direction, bytes, offset);
}

namespace {

std::unique_ptr<Runtime> choose_runtime(void (*notice)(const std::string&)) {
  const char* env = std::getenv("TORCH_MEMOPS_FPGA");
  const std::string wanted = env == nullptr ? "" : env;
  if (wanted == "emulation") return make_emulation_runtime();
  if (wanted == "xrt") {
    if (!native_runtime_built())
      throw std::runtime_error(
          "TORCH_MEMOPS_FPGA=xrt, but torch_memops was built without XRT (no XRT headers and "
          "libraries were found at build time); rebuild with XRT installed or set "
          "TORCH_MEMOPS_FPGA=emulation");
    if (native_device_count() == 0)
      throw std::runtime_error(
          "TORCH_MEMOPS_FPGA=xrt, but XRT finds no FPGA card (check `xbutil examine`)");
    return make_native_runtime();
  }
  if (!wanted.empty())
    throw std::runtime_error("TORCH_MEMOPS_FPGA must be \"xrt\" or \"emulation\", got \"" +
                             wanted + "\"");
  if (native_runtime_built() && native_device_count() > 0) return make_native_runtime();
  if (notice != nullptr)
    notice(native_runtime_built()
               ? "torch_memops: no FPGA card found by XRT; the fpga device runs in emulation "
                 "(HLS kernels compiled for the host). Set TORCH_MEMOPS_FPGA=emulation to "
                 "silence this notice."
               : "torch_memops: built without XRT; the fpga device runs in emulation (HLS "
                 "kernels compiled for the host). Set TORCH_MEMOPS_FPGA=emulation to silence "
                 "this notice.");
  return make_emulation_runtime();
}

}  // namespace

Runtime& runtime(void (*notice)(const std::string&)) {
  static std::once_flag once;
  static std::unique_ptr<Runtime> chosen;
  std::call_once(once, [&] {
    std::unique_ptr<Runtime> candidate = choose_runtime(notice);
    const char* xclbin = std::getenv("TORCH_MEMOPS_XCLBIN");
    if (xclbin != nullptr && *xclbin != '\0') candidate->load_xclbin(xclbin);
    chosen = std::move(candidate);
  });
  return *chosen;
}

}  // namespace memops::fpga
