"""``MemopsConfig(offload="host")``: the keys and values of the sparse layers in page-locked host
memory that the GPU reads in place (zero-copy), so only the pages a step selects cross PCIe.

On a 64-bit CUDA system (unified virtual addressing) memory from ``cudaHostAlloc``, which is what
``torch.empty(..., pin_memory=True)`` allocates, is mapped into the address space of every GPU at
the same address: a kernel may read and write it, and each access crosses PCIe. Such a buffer is
wrapped here as a CUDA tensor (through ``__cuda_array_interface__``, which torch accepts without
copying), and the layer's storage is the ordinary :class:`~.storage.LayerStorage` with every step
on the GPU. So a decode step is the all-GPU step: the new token is written into host memory by
the GPU, Prepare reads the newest page, Relevancy reads the page summary (on the GPU, 1/P of the
keys), and ``sparse_apply`` reads the selected pages of keys and values straight from host
memory. There is no host gather, no staging buffer and no synchronisation, so the static cache,
``torch.compile`` and CUDA graphs work as on the GPU (measured on an H200: the kernel reads the
selected pages at 43-45 GB/s, the copy engine's pinned copy runs at 55 GB/s).

Where the model is on the CPU there is nothing to map: the buffers are ordinary host tensors and
the layer is the CPU pipeline. ``offload="host_gather"`` (``offload.py``) is the other route, for
a GPU that cannot read host memory in place: the host gathers the pages and copies them.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .config import STEPS
from .storage import LayerStorage

# __cuda_array_interface__ type strings by element size: the alias is made as an integer tensor
# of the same width and viewed as the buffer's dtype (the interface has no bfloat16).
_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


class _PinnedInterface:
    """``__cuda_array_interface__`` of a pinned host tensor; holds the tensor while the alias lives."""

    def __init__(self, host: Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"version": 3, "shape": tuple(host.shape),
                                         "typestr": _TYPESTR[host.element_size()], "strides": None,
                                         "data": (host.data_ptr(), False)}


def device_alias(host: Tensor, device: torch.device) -> Tensor:
    """A tensor on ``device`` (CUDA) whose storage is the pinned, contiguous ``host`` tensor."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_alias: host must be a pinned, contiguous tensor")
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    with torch.cuda.device(device):
        alias = torch.as_tensor(_PinnedInterface(host), device=device).view(host.dtype)
    if alias.data_ptr() != host.data_ptr() or alias.device != device:
        raise RuntimeError(
            f"MemopsConfig(offload='host'): {device} cannot address pinned host memory in place "
            f"(got {alias.device} at {alias.data_ptr():#x} for host {host.data_ptr():#x}); use offload='host_gather'")
    return alias


class MappedLayerStorage(LayerStorage):
    """A sparse layer's storage with keys and values in pinned host memory, read in place.

    Every step runs on the model's device; only the allocation of the key/value buffers differs
    from :class:`LayerStorage` (also when they grow, or a row selection rebuilds them)."""

    def __init__(self, *, method, page_size: int, device: torch.device, key_states: Tensor,
                 value_states: Tensor, capacity: Optional[int], pin_memory: bool):
        self.mapped = device.type == "cuda"
        self.pinned = self.mapped  # the GPU can only address page-locked memory
        if self.mapped and not pin_memory:
            raise ValueError("MemopsConfig(offload='host', pin_memory=False): the GPU reads the host buffers in "
                             "place, which needs page-locked memory; use pin_memory=True or offload='host_gather'")
        devices: Dict[str, torch.device] = {step: device for step in STEPS}
        super().__init__(method=method, page_size=page_size, sparse=True, devices=devices,
                         key_states=key_states, value_states=value_states, capacity=capacity)

    def _new_kv(self, shape, dtype, zero: bool) -> Tensor:
        host = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, pin_memory=self.pinned)
        return device_alias(host, self.memory_device) if self.mapped else host

    def _rehome_kv(self, tensor: Tensor) -> Tensor:
        """A row selection made a new tensor on the GPU: move it back to mapped host memory."""
        buffer = self._new_kv(tensor.shape, tensor.dtype, zero=False)
        buffer.copy_(tensor)
        return buffer

    def _prefill_summary_source(self, key_states: Tensor) -> Optional[Tensor]:
        # Dynamic: the prefill's keys where they already are (the GPU), not read back over PCIe.
        # Static: the buffer, so that every page past the prefill is reset too.
        return None if self.static else key_states
