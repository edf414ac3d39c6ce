// One interface to the FPGA runtime, two implementations with the same semantics:
//  - native XRT (xrt::device, xrt::bo, xrt::kernel, xrt::run), built when XRT is found;
//  - strict emulation: the HLS kernels compiled for the host; every buffer object keeps a device
//    copy and a host copy apart, so a missing sync shows up as stale data; device-only buffers
//    cannot be mapped; banks are checked against the U55C's HBM.
// Framework-free: nothing here includes torch, so the runtime can be built into small programs
// (the link test of the native path) as well as into the extension.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace memops::fpga {

// Alveo U55C: 16 GiB of HBM2 as 32 pseudo-channels of 512 MiB.
constexpr int kHbmBanks = 32;
constexpr size_t kHbmBankBytes = size_t{512} << 20;
// Buffer objects start on a page boundary in both implementations.
constexpr size_t kBufferAlignment = 4096;

enum class SyncDirection { kToDevice, kFromDevice };

enum class BufferKind {
  kNormal,      // host copy + device copy (xrt::bo::flags::normal)
  kDeviceOnly,  // device copy only (xrt::bo::flags::device_only): cannot be mapped or synced
};

// A buffer object. map() and sync() enforce the rules that both implementations share (no host
// copy for device-only buffers, ranges inside the buffer) and then call the implementation.
class BufferObject {
 public:
  virtual ~BufferObject() = default;
  virtual size_t size() const = 0;
  virtual int bank() const = 0;
  virtual BufferKind kind() const = 0;
  // The host copy. Throws std::runtime_error for device-only buffers.
  void* map();
  // Copies [offset, offset + bytes) between the host copy and the device copy.
  void sync(SyncDirection direction, size_t bytes, size_t offset);

 protected:
  virtual void* map_host_copy() = 0;
  virtual void sync_range(SyncDirection direction, size_t bytes, size_t offset) = 0;
};

// A kernel argument: a buffer object (the kernel sees its device copy) or a 64-bit scalar.
struct KernelArg {
  BufferObject* buffer = nullptr;
  int64_t scalar = 0;

  static KernelArg of(BufferObject* bo) { return KernelArg{bo, 0}; }
  static KernelArg of(int64_t value) { return KernelArg{nullptr, value}; }
};

class Runtime {
 public:
  virtual ~Runtime() = default;
  // "xrt" or "emulation".
  virtual std::string backend() const = 0;
  virtual std::string device_name() const = 0;
  // Loads an xclbin (native: programs the card; emulation: checks the file exists and records
  // it: the kernels themselves are always the host-compiled HLS sources).
  virtual void load_xclbin(const std::string& path) = 0;
  // The path last loaded ("" before any).
  std::string loaded_xclbin() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return xclbin_;
  }
  // A buffer object of `bytes` (> 0) in HBM pseudo-channel `bank`.
  virtual std::unique_ptr<BufferObject> allocate(size_t bytes, int bank, BufferKind kind) = 0;
  // Device-to-device copy (xrt::bo::copy).
  virtual void copy(BufferObject& dst, size_t dst_offset, BufferObject& src, size_t src_offset,
                    size_t bytes) = 0;
  // Runs kernel `name` (the HLS top function, e.g. "memops_gather_retrieve") to completion.
  virtual void run(const std::string& name, const std::vector<KernelArg>& args) = 0;

 protected:
  // Guards xclbin_ and whatever state a runtime derives from the loaded xclbin.
  mutable std::mutex mutex_;
  std::string xclbin_;
};

// Throws std::runtime_error unless 0 <= bank < kHbmBanks.
void check_bank(int bank);

// The process-wide runtime, chosen on first use: TORCH_MEMOPS_FPGA=emulation or =xrt forces one;
// otherwise native XRT when it was built and a card is present, else emulation (with a one-time
// notice through `notice`, which receives the message). TORCH_MEMOPS_XCLBIN, when set, is
// loaded right away.
Runtime& runtime(void (*notice)(const std::string&) = nullptr);

std::unique_ptr<Runtime> make_emulation_runtime();
// nullptr when the extension was built without XRT.
std::unique_ptr<Runtime> make_native_runtime();
// Number of XRT devices (0 when built without XRT or none is present).
int native_device_count();
bool native_runtime_built();

}  // namespace memops::fpga
