// Strict emulation of the XRT runtime. A buffer object owns two allocations, the device copy
// (what kernels read and write) and the host copy (what map() returns); only sync() moves data
// between them, so host code that forgets a sync sees stale data, as it would on a card.
#include <array>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "fpga/xrt_runtime.h"
#include "gather_retrieve/gather_retrieve.h"
#include "prepare_memory/prepare_memory.h"
#include "topk_relevancy/topk_relevancy.h"

namespace memops::fpga {
namespace {

// Byte pattern of freshly allocated device memory, so that reading data that was never synced
// to the device gives recognisable garbage rather than zeros.
constexpr unsigned char kUninitialisedDevice = 0xDE;

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<char, AlignedFree>;

AlignedBytes aligned_bytes(size_t bytes) {
  const size_t rounded = (bytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
  void* p = std::aligned_alloc(kBufferAlignment, rounded);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBytes(static_cast<char*>(p));
}

// Bytes in use per HBM pseudo-channel, shared by the runtime and its live buffers.
struct BankUsage {
  std::mutex mutex;
  std::array<size_t, kHbmBanks> used{};
};

class EmulatedBuffer final : public BufferObject {
 public:
  EmulatedBuffer(size_t bytes, int bank, BufferKind kind, std::shared_ptr<BankUsage> usage)
      : bytes_(bytes), bank_(bank), kind_(kind), usage_(std::move(usage)),
        device_(aligned_bytes(bytes)) {
    std::memset(device_.get(), kUninitialisedDevice, bytes);
    if (kind == BufferKind::kNormal) {
      host_ = aligned_bytes(bytes);
      std::memset(host_.get(), 0, bytes);
    }
  }
  ~EmulatedBuffer() override {
    std::lock_guard<std::mutex> lock(usage_->mutex);
    usage_->used[bank_] -= bytes_;
  }

  size_t size() const override { return bytes_; }
  int bank() const override { return bank_; }
  BufferKind kind() const override { return kind_; }

  char* device_data() { return device_.get(); }

 protected:
  void* map_host_copy() override { return host_.get(); }

  void sync_range(SyncDirection direction, size_t bytes, size_t offset) override {
    if (direction == SyncDirection::kToDevice)
      std::memcpy(device_.get() + offset, host_.get() + offset, bytes);
    else
      std::memcpy(host_.get() + offset, device_.get() + offset, bytes);
  }

 private:
  size_t bytes_;
  int bank_;
  BufferKind kind_;
  std::shared_ptr<BankUsage> usage_;
  AlignedBytes device_;
  AlignedBytes host_;
};

// A kernel argument as the host-compiled top function sees it: a buffer's device copy or a
// scalar.
struct EmulatedArg {
  const KernelArg& arg;

  template <typename T>
  operator T*() const {
    return reinterpret_cast<T*>(static_cast<EmulatedBuffer*>(arg.buffer)->device_data());
  }
  operator int64_t() const { return arg.scalar; }
};

template <typename... Params, size_t... I>
void invoke(void (*top)(Params...), const std::vector<KernelArg>& args,
            std::index_sequence<I...>) {
  top(EmulatedArg{args[I]}...);
}

// Calls a kernel's top function after checking the arguments against its signature, as
// xrt::run::set_arg does against the xclbin's kernel metadata.
template <typename... Params>
void call_top(const std::string& name, void (*top)(Params...),
              const std::vector<KernelArg>& args) {
  if (args.size() != sizeof...(Params))
    throw std::runtime_error("kernel " + name + " takes " + std::to_string(sizeof...(Params)) +
                             " arguments, got " + std::to_string(args.size()));
  constexpr std::array<bool, sizeof...(Params)> is_buffer{std::is_pointer_v<Params>...};
  for (size_t i = 0; i < args.size(); ++i)
    if (is_buffer[i] != (args[i].buffer != nullptr))
      throw std::runtime_error("kernel " + name + ": argument " + std::to_string(i) +
                               (is_buffer[i] ? " must be a buffer object" : " must be a scalar"));
  invoke(top, args, std::index_sequence_for<Params...>{});
}

class EmulationRuntime final : public Runtime {
 public:
  EmulationRuntime() : usage_(std::make_shared<BankUsage>()) {
    kernels_["memops_prepare_memory"] = [](const std::vector<KernelArg>& a) {
      call_top("memops_prepare_memory", &memops_prepare_memory, a);
    };
    kernels_["memops_topk_relevancy"] = [](const std::vector<KernelArg>& a) {
      call_top("memops_topk_relevancy", &memops_topk_relevancy, a);
    };
    kernels_["memops_gather_retrieve"] = [](const std::vector<KernelArg>& a) {
      call_top("memops_gather_retrieve", &memops_gather_retrieve, a);
    };
  }

  std::string backend() const override { return "emulation"; }
  std::string device_name() const override {
    return "emulated xilinx_u55c_gen3x16_xdma_3_202210_1 (HLS kernels compiled for the host)";
  }

  void load_xclbin(const std::string& path) override {
    if (!std::filesystem::is_regular_file(path))
      throw std::runtime_error("xclbin file not found: " + path);
    std::lock_guard<std::mutex> lock(mutex_);
    xclbin_ = path;
  }

  std::unique_ptr<BufferObject> allocate(size_t bytes, int bank, BufferKind kind) override {
    check_bank(bank);
    if (bytes == 0) throw std::runtime_error("a buffer object needs at least one byte");
    {
      std::lock_guard<std::mutex> lock(usage_->mutex);
      if (bytes > kHbmBankBytes - usage_->used[bank])
        throw std::runtime_error("HBM bank " + std::to_string(bank) + " is full: " +
                                 std::to_string(usage_->used[bank]) + " of " +
                                 std::to_string(kHbmBankBytes) + " bytes in use, " +
                                 std::to_string(bytes) + " more requested");
      usage_->used[bank] += bytes;
    }
    return std::make_unique<EmulatedBuffer>(bytes, bank, kind, usage_);
  }

  void copy(BufferObject& dst, size_t dst_offset, BufferObject& src, size_t src_offset,
            size_t bytes) override {
    if (dst_offset + bytes > dst.size() || src_offset + bytes > src.size())
      throw std::runtime_error("device copy outside a buffer object");
    std::memmove(static_cast<EmulatedBuffer&>(dst).device_data() + dst_offset,
                 static_cast<EmulatedBuffer&>(src).device_data() + src_offset, bytes);
  }

  void run(const std::string& name, const std::vector<KernelArg>& args) override {
    const auto kernel = kernels_.find(name);
    if (kernel == kernels_.end())
      throw std::runtime_error("no kernel named " + name + " in the emulated xclbin");
    // One compute unit per kernel: runs do not overlap.
    std::lock_guard<std::mutex> lock(run_mutex_);
    kernel->second(args);
  }

 private:
  std::shared_ptr<BankUsage> usage_;
  std::map<std::string, std::function<void(const std::vector<KernelArg>&)>> kernels_;
  std::mutex run_mutex_;
};

}  // namespace

std::unique_ptr<Runtime> make_emulation_runtime() { return std::make_unique<EmulationRuntime>(); }

}  // namespace memops::fpga
