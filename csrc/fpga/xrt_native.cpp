// Native XRT implementation of the runtime interface (built when XRT is found: MEMOPS_WITH_XRT).
// Buffer objects are xrt::bo in the HBM pseudo-channel asked for; kernels are the xclbin's compute
// units, run through xrt::kernel / xrt::run with the same arguments as the emulation.
#include "fpga/xrt_runtime.h"

#if defined(MEMOPS_WITH_XRT)

#include <experimental/xrt_system.h>
#include <experimental/xrt_xclbin.h>
#include <xrt/xrt_bo.h>
#include <xrt/xrt_device.h>
#include <xrt/xrt_kernel.h>

#include <map>
#include <mutex>
#include <stdexcept>

namespace memops::fpga {
namespace {

class NativeBuffer final : public BufferObject {
 public:
  NativeBuffer(xrt::bo bo, int bank, BufferKind kind)
      : bo_(std::move(bo)), bank_(bank), kind_(kind) {}

  size_t size() const override { return bo_.size(); }
  int bank() const override { return bank_; }
  BufferKind kind() const override { return kind_; }

  xrt::bo& bo() { return bo_; }

 protected:
  void* map_host_copy() override { return bo_.map(); }

  void sync_range(SyncDirection direction, size_t bytes, size_t offset) override {
    bo_.sync(direction == SyncDirection::kToDevice ? XCL_BO_SYNC_BO_TO_DEVICE
                                                   : XCL_BO_SYNC_BO_FROM_DEVICE,
             bytes, offset);
  }

 private:
  xrt::bo bo_;
  int bank_;
  BufferKind kind_;
};

class NativeRuntime final : public Runtime {
 public:
  NativeRuntime() : device_(0) {}

  std::string backend() const override { return "xrt"; }
  std::string device_name() const override {
    return device_.get_info<xrt::info::device::name>();
  }

  void load_xclbin(const std::string& path) override {
    const xrt::xclbin xclbin(path);
    std::lock_guard<std::mutex> lock(mutex_);
    uuid_ = device_.load_xclbin(xclbin);
    kernels_.clear();
    bank_groups_.clear();
    // Memory tags look like "HBM[7]"; the group id XRT expects is the memory's index.
    for (const auto& mem : xclbin.get_mems()) {
      const std::string tag = mem.get_tag();
      if (tag.rfind("HBM[", 0) != 0) continue;
      bank_groups_[std::stoi(tag.substr(4))] = mem.get_index();
    }
    xclbin_ = path;
  }

  std::unique_ptr<BufferObject> allocate(size_t bytes, int bank, BufferKind kind) override {
    check_bank(bank);
    std::lock_guard<std::mutex> lock(mutex_);
    if (xclbin_.empty())
      throw std::runtime_error(
          "no xclbin loaded: call torch_memops.fpga.load(path) (or set TORCH_MEMOPS_XCLBIN) "
          "before allocating on the fpga device");
    const auto group = bank_groups_.find(bank);
    if (group == bank_groups_.end())
      throw std::runtime_error("the loaded xclbin does not use HBM bank " +
                               std::to_string(bank));
    const auto flags =
        kind == BufferKind::kDeviceOnly ? xrt::bo::flags::device_only : xrt::bo::flags::normal;
    return std::make_unique<NativeBuffer>(xrt::bo(device_, bytes, flags, group->second), bank,
                                          kind);
  }

  void copy(BufferObject& dst, size_t dst_offset, BufferObject& src, size_t src_offset,
            size_t bytes) override {
    static_cast<NativeBuffer&>(dst).bo().copy(static_cast<NativeBuffer&>(src).bo(), bytes,
                                              src_offset, dst_offset);
  }

  void run(const std::string& name, const std::vector<KernelArg>& args) override {
    xrt::run run(kernel(name));
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].buffer != nullptr)
        run.set_arg(static_cast<int>(i), static_cast<NativeBuffer*>(args[i].buffer)->bo());
      else
        run.set_arg(static_cast<int>(i), args[i].scalar);
    }
    run.start();
    const ert_cmd_state state = run.wait();
    if (state != ERT_CMD_STATE_COMPLETED)
      throw std::runtime_error("kernel " + name + " did not complete (ert state " +
                               std::to_string(static_cast<int>(state)) + ")");
  }

 private:
  xrt::kernel& kernel(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (xclbin_.empty())
      throw std::runtime_error("no xclbin loaded: call torch_memops.fpga.load(path) first");
    auto found = kernels_.find(name);
    if (found == kernels_.end())
      found = kernels_.emplace(name, xrt::kernel(device_, uuid_, name)).first;
    return found->second;
  }

  xrt::device device_;
  xrt::uuid uuid_;
  std::map<std::string, xrt::kernel> kernels_;
  std::map<int, int> bank_groups_;
};

}  // namespace

std::unique_ptr<Runtime> make_native_runtime() { return std::make_unique<NativeRuntime>(); }
// XRT throws when it is not set up (no XILINX_XRT, no driver): that is "no card" here.
int native_device_count() {
  try {
    return static_cast<int>(xrt::system::enumerate_devices());
  } catch (const std::exception&) {
    return 0;
  }
}
bool native_runtime_built() { return true; }

}  // namespace memops::fpga

#else

namespace memops::fpga {

std::unique_ptr<Runtime> make_native_runtime() { return nullptr; }
int native_device_count() { return 0; }
bool native_runtime_built() { return false; }

}  // namespace memops::fpga

#endif
