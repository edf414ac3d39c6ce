// The fpga device: allocator (one XRT buffer object per storage), device guard, the aten kernels a
// memory device needs, and the boxed CPU fallback for every other aten op.
#include <ATen/EmptyTensor.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>

#include "fpga/fpga_tensor.h"

namespace memops::fpga {
namespace {

const c10::Device kFpga(c10::DeviceType::FPGA, 0);

void warn_notice(const std::string& message) { TORCH_WARN(message); }

std::atomic<int>& default_bank_slot() {
  static std::atomic<int> bank{0};
  return bank;
}

// Host-copy pointer -> buffer object, for Allocator::copy_data, which only gets pointers.
struct BufferRegistry {
  std::mutex mutex;
  std::unordered_map<const void*, BufferObject*> by_data;
};
BufferRegistry& registry() {
  static BufferRegistry r;
  return r;
}

// Device-only buffers have no host copy; their storage's data pointer is the buffer object
// itself, an address that is unique and never dereferenced (every host access checks the kind).
void* storage_data(BufferObject* bo) {
  return bo->kind() == BufferKind::kNormal ? bo->map() : static_cast<void*>(bo);
}

void delete_buffer(void* context) {
  auto* bo = static_cast<BufferObject*>(context);
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().by_data.erase(storage_data(bo));
  }
  delete bo;
}

c10::DataPtr wrap_buffer(std::unique_ptr<BufferObject> bo) {
  void* data = storage_data(bo.get());
  BufferObject* raw = bo.release();
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().by_data[data] = raw;
  }
  return {data, raw, &delete_buffer, kFpga};
}

c10::DataPtr allocate_in_bank(size_t nbytes, int bank, BufferKind kind) {
  if (nbytes == 0) return {nullptr, nullptr, &c10::detail::deleteNothing, kFpga};
  try {
    return wrap_buffer(fpga_runtime().allocate(nbytes, bank, kind));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "fpga: cannot allocate ", nbytes, " bytes in HBM bank ", bank, ": ",
                e.what());
  }
}

class FpgaAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    return allocate_in_bank(nbytes, default_bank(), BufferKind::kNormal);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    BufferObject *dst_bo = nullptr, *src_bo = nullptr;
    {
      std::lock_guard<std::mutex> lock(registry().mutex);
      dst_bo = registry().by_data.at(dest);
      src_bo = registry().by_data.at(src);
    }
    fpga_runtime().copy(*dst_bo, 0, *src_bo, 0, count);
  }
};

FpgaAllocator& allocator() {
  static FpgaAllocator a;
  return a;
}

void check_device(std::optional<c10::Device> device) {
  if (device.has_value())
    TORCH_CHECK(device->type() == c10::DeviceType::FPGA && device->index() <= 0,
                "fpga: only device fpga:0 exists, got ", *device);
}

at::Tensor empty_fpga(at::IntArrayRef size, std::optional<at::ScalarType> dtype,
                      std::optional<at::Layout> layout, std::optional<c10::Device> device,
                      std::optional<bool> pin_memory,
                      std::optional<c10::MemoryFormat> memory_format) {
  check_device(device);
  TORCH_CHECK(layout.value_or(at::kStrided) == at::kStrided, "fpga: only strided tensors");
  return at::detail::empty_generic(size, &allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::FPGA),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided_fpga(at::IntArrayRef size, at::IntArrayRef stride,
                              std::optional<at::ScalarType> dtype,
                              std::optional<at::Layout> layout, std::optional<c10::Device> device,
                              std::optional<bool> pin_memory) {
  check_device(device);
  TORCH_CHECK(layout.value_or(at::kStrided) == at::kStrided, "fpga: only strided tensors");
  return at::detail::empty_strided_generic(size, stride, &allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::FPGA),
                                           c10::dtype_or_default(dtype));
}

bool is_fpga(const at::Tensor& t) { return t.device().type() == c10::DeviceType::FPGA; }

// Writes a CPU tensor into an fpga view: host copy, then sync to the device. A view that does not
// cover its byte range densely first refreshes that range from the device, so the bytes between
// its elements keep their device values when the range is synced back.
void write_from_cpu(const at::Tensor& dst, const at::Tensor& src) {
  if (!dst.is_non_overlapping_and_dense()) sync_view(dst, SyncDirection::kFromDevice);
  host_alias(dst).copy_(src);
  sync_view(dst, SyncDirection::kToDevice);
}

at::Tensor read_to_cpu(const at::Tensor& src) {
  sync_view(src, SyncDirection::kFromDevice);
  return host_alias(src);
}

at::Tensor copy_from_fpga(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  // Broadcasting and dtype conversion are left to the CPU-side copy_.
  if (dst.numel() == 0) return dst;
  if (self.is_cpu() && is_fpga(dst)) {
    write_from_cpu(dst, self);
  } else if (is_fpga(self) && dst.is_cpu()) {
    dst.copy_(read_to_cpu(self));
  } else if (is_fpga(self) && is_fpga(dst)) {
    if (self.scalar_type() == dst.scalar_type() && self.is_contiguous() && dst.is_contiguous() &&
        self.sizes() == dst.sizes()) {
      fpga_runtime().copy(*buffer_of(dst), byte_offset(dst), *buffer_of(self), byte_offset(self),
                          static_cast<size_t>(self.nbytes()));
    } else {
      // Through a CPU staging tensor: the views may overlap in one buffer object.
      write_from_cpu(dst, read_to_cpu(self).clone());
    }
  } else if (is_fpga(dst)) {
    // Another device (a GPU) -> fpga: through host memory, as the card's DMA would be fed.
    write_from_cpu(dst, self.to(c10::kCPU));
  } else if (is_fpga(self)) {
    // fpga -> another device: read to host memory, then that device's own copy.
    dst.copy_(read_to_cpu(self), non_blocking);
  } else {
    TORCH_CHECK(false, "fpga: a copy with neither end on the fpga reached its copy kernel: ", self.device(),
                " -> ", dst.device());
  }
  return dst;
}

const at::Tensor& resize_fpga(const at::Tensor& self, at::IntArrayRef size,
                              std::optional<c10::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_sizes_contiguous(size);
  if (memory_format.has_value()) impl->empty_tensor_restride(*memory_format);
  const size_t needed =
      at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.itemsize(),
                                       static_cast<size_t>(self.storage_offset()));
  const c10::Storage& storage = self.storage();
  const size_t held = storage.nbytes();
  if (needed > held) {
    c10::DataPtr fresh = allocator().allocate(needed);
    if (held > 0)
      fpga_runtime().copy(*static_cast<BufferObject*>(fresh.get_context()), 0,
                          *static_cast<BufferObject*>(storage.data_ptr().get_context()), 0, held);
    storage.unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(fresh));
    storage.unsafeGetStorageImpl()->set_nbytes(needed);
  }
  return self;
}

at::Tensor& fill_fpga(at::Tensor& self, const c10::Scalar& value) {
  if (self.numel() == 0) return self;
  write_from_cpu(self, at::scalar_tensor(value, self.options().device(c10::kCPU)));
  return self;
}

at::Tensor _copy_from_and_resize_fpga(const at::Tensor& self, const at::Tensor& dst) {
  if (dst.sizes() != self.sizes()) resize_fpga(dst, self.sizes(), std::nullopt);
  return copy_from_fpga(self, dst, false);
}

// set_ points a tensor at (part of) an fpga storage. torch.load rebuilds every tensor this way,
// and storage copies (storage.cpu(), copy.deepcopy) go through it; the CPU fallback cannot, as it
// would alias a CPU copy. The storage must already hold the view (no resize here).
at::Tensor& set_storage_fpga(at::Tensor& self, c10::Storage source, int64_t storage_offset,
                             at::IntArrayRef size, at::IntArrayRef stride) {
  TORCH_CHECK(source.device().type() == c10::DeviceType::FPGA,
              "fpga: set_ needs a storage on the fpga device, got one on ", source.device());
  at::native::checkSetStorage(self, source, storage_offset, size, stride);
  std::vector<int64_t> strides = stride.vec();
  if (stride.empty()) {
    strides.assign(size.size(), 1);
    for (int64_t d = static_cast<int64_t>(size.size()) - 2; d >= 0; --d)
      strides[d] = strides[d + 1] * std::max<int64_t>(size[d + 1], 1);
  }
  at::native::setStrided(self, size, at::IntArrayRef(strides), storage_offset);
  return self;
}

at::Tensor& set_source_storage_fpga(at::Tensor& self, c10::Storage source) {
  const int64_t numel = static_cast<int64_t>(source.nbytes() / self.itemsize());
  return set_storage_fpga(self, std::move(source), 0, {numel}, {1});
}

at::Tensor& set_source_tensor_fpga(at::Tensor& self, const at::Tensor& source) {
  return set_storage_fpga(self, source.storage(), source.storage_offset(), source.sizes(),
                          source.strides());
}

void fpga_cpu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::native::cpu_fallback(op, stack);
}

// One fpga device (index 0) without streams: kernels run to completion in call order.
struct FpgaGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::FPGA; }
  c10::Device exchangeDevice(c10::Device d) const override {
    setDevice(d);
    return kFpga;
  }
  c10::Device getDevice() const override { return kFpga; }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == c10::DeviceType::FPGA && d.index() <= 0,
                "fpga: only device fpga:0 exists, got ", d);
  }
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, kFpga);
  }
  c10::Stream exchangeStream(c10::Stream) const override {
    return c10::Stream(c10::Stream::DEFAULT, kFpga);
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
};

C10_REGISTER_GUARD_IMPL(FPGA, FpgaGuardImpl);

TORCH_LIBRARY_IMPL(aten, FPGA, m) {
  m.impl("empty.memory_format", TORCH_FN(empty_fpga));
  m.impl("empty_strided", TORCH_FN(empty_strided_fpga));
  m.impl("_copy_from", TORCH_FN(copy_from_fpga));
  m.impl("_copy_from_and_resize", TORCH_FN(_copy_from_and_resize_fpga));
  m.impl("view", TORCH_FN(at::native::view));
  m.impl("as_strided", TORCH_FN(at::native::as_strided_tensorimpl));
  m.impl("_reshape_alias", TORCH_FN(at::native::_reshape_alias));
  m.impl("resize_", TORCH_FN(resize_fpga));
  m.impl("fill_.Scalar", TORCH_FN(fill_fpga));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(set_storage_fpga));
  m.impl("set_.source_Storage", TORCH_FN(set_source_storage_fpga));
  m.impl("set_.source_Tensor", TORCH_FN(set_source_tensor_fpga));
}

TORCH_LIBRARY_IMPL(_, FPGA, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fpga_cpu_fallback>());
}

}  // namespace

Runtime& fpga_runtime() {
  try {
    return runtime(&warn_notice);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "fpga: ", e.what());
  }
}

int default_bank() { return default_bank_slot().load(); }

void set_default_bank(int bank) {
  try {
    check_bank(bank);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, "fpga: `bank`: ", e.what());
  }
  default_bank_slot().store(bank);
}

at::Tensor empty_in_bank(at::IntArrayRef size, at::ScalarType dtype, int bank, bool device_only) {
  try {
    check_bank(bank);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, "fpga: `bank`: ", e.what());
  }
  const size_t nbytes =
      at::detail::computeStorageNbytesContiguous(size, c10::elementSize(dtype));
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       allocate_in_bank(nbytes, bank,
                                        device_only ? BufferKind::kDeviceOnly
                                                    : BufferKind::kNormal),
                       &allocator(), /*resizable=*/false);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::FPGA),
      c10::scalarTypeToTypeMeta(dtype));
  t.unsafeGetTensorImpl()->set_sizes_contiguous(size);
  return t;
}

BufferObject* buffer_of(const at::Tensor& t) {
  TORCH_CHECK(is_fpga(t), "fpga: expected a tensor on the fpga device, got ", t.device());
  const c10::DataPtr& ptr = t.storage().data_ptr();
  if (ptr.get() == nullptr) return nullptr;
  TORCH_CHECK(ptr.get_deleter() == &delete_buffer,
              "fpga: the tensor's storage is not an XRT buffer object of torch_memops");
  return static_cast<BufferObject*>(ptr.get_context());
}

size_t byte_offset(const at::Tensor& t) {
  return static_cast<size_t>(t.storage_offset()) * t.itemsize();
}

size_t byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) >= 0, "fpga: negative strides are not supported");
    last += (t.size(d) - 1) * t.stride(d);
  }
  return static_cast<size_t>(last + 1) * t.itemsize();
}

void sync_view(const at::Tensor& t, SyncDirection direction) {
  BufferObject* bo = buffer_of(t);
  if (bo == nullptr || t.numel() == 0) return;
  try {
    bo->sync(direction, byte_extent(t), byte_offset(t));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "fpga: ", e.what());
  }
}

at::Tensor host_alias(const at::Tensor& t) {
  const at::TensorOptions cpu = t.options().device(c10::kCPU);
  BufferObject* bo = buffer_of(t);
  if (bo == nullptr) return at::empty(t.sizes(), cpu);
  char* host = nullptr;
  try {
    host = static_cast<char*>(bo->map());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "fpga: ", e.what());
  }
  c10::Storage keep_alive = t.storage();
  return at::from_blob(
      host + byte_offset(t), t.sizes(), t.strides(), [keep_alive](void*) {}, cpu);
}

}  // namespace memops::fpga
