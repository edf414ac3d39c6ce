// Tensors on the fpga device (DispatchKey::FPGA) and the XRT buffer objects behind them.
//
// Mapping: every storage is one buffer object; the storage's data pointer is the buffer's host
// copy. The device copy is authoritative: copies into an fpga tensor write the host copy and
// sync it to the device, copies out of one sync from the device first, and the memops kernels
// read and write device copies only. So the host copy of an fpga tensor is a staging area; what
// it holds between copies is unspecified (host_copy() shows it as it is, for tests).
#pragma once

#include <ATen/ATen.h>

#include "fpga/xrt_runtime.h"

namespace memops::fpga {

// The process's runtime (chosen on first use; the emulation notice becomes a Python warning).
Runtime& fpga_runtime();

// HBM pseudo-channel that new fpga allocations go to (0 by default).
int default_bank();
void set_default_bank(int bank);

// A new fpga storage-backed tensor in `bank`; device_only buffers have no host copy.
at::Tensor empty_in_bank(at::IntArrayRef size, at::ScalarType dtype, int bank, bool device_only);

// The buffer object of an fpga tensor (nullptr for a tensor without storage bytes).
BufferObject* buffer_of(const at::Tensor& t);
// Byte offset of the tensor's first element in its buffer object.
size_t byte_offset(const at::Tensor& t);
// Bytes from the first element to one past the last one addressed by the view.
size_t byte_extent(const at::Tensor& t);

// Syncs the bytes a view addresses, in one direction.
void sync_view(const at::Tensor& t, SyncDirection direction);
// A CPU tensor that aliases the host copy of an fpga tensor (no sync; keeps the storage alive).
at::Tensor host_alias(const at::Tensor& t);

}  // namespace memops::fpga
