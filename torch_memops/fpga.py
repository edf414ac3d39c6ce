"""The ``fpga`` device: XRT buffer objects, HLS kernels, native XRT or strict emulation.

Tensors on ``torch.device("fpga")`` (PyTorch's ``DispatchKey::FPGA``, registered by
``torch_memops._C``) live in XRT buffer objects in the HBM of an Alveo U55C. ``t.to("fpga")``
writes a buffer's host copy and syncs it to the device, ``t.cpu()`` syncs it back, and the
``memops`` operators run as HLS kernels on the device copies. Other aten ops fall back to the CPU.

Two runtimes implement this with the same semantics (see ``docs/fpga.md``):

* ``"xrt"``: a real card through XRT (``xrt::device``, ``xrt::bo``, ``xrt::kernel``); load the
  xclbin built from ``hls/`` with :func:`load` before allocating.
* ``"emulation"``: the same HLS kernel sources compiled for the host, with separate device and host
  copies per buffer object. Chosen with ``TORCH_MEMOPS_FPGA=emulation``, or automatically (with a
  one-time warning) when no card is found or torch_memops was built without XRT.

Examples
--------
>>> import torch, torch_memops
>>> keys = torch.randn(1, 2, 64, 32, dtype=torch.float16).to("fpga")
>>> summary = torch_memops.prepare_memory(keys, 16)  # runs the prepare_memory HLS kernel
>>> torch_memops.fpga.backend() in ("xrt", "emulation")
True
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from torch_memops import _C  # noqa: F401  (registers the fpga device and memops_fpga ops)

__all__ = [
    "is_available",
    "is_built_with_xrt",
    "backend",
    "device_name",
    "load",
    "loaded_xclbin",
    "devices",
    "board_info",
    "default_bank",
    "set_default_bank",
    "bank",
    "empty",
    "bank_of",
    "sync",
    "host_copy",
    "HBM_BANKS",
]

#: HBM pseudo-channels of the Alveo U55C (banks ``0 .. 31``, 512 MiB each).
HBM_BANKS = 32

_PYXRT_MISSING = (
    "pyxrt is not importable: it ships with XRT (/opt/xilinx/xrt/python, put on PYTHONPATH by "
    "`source /opt/xilinx/xrt/setup.sh`), not on PyPI; device enumeration and board info need it"
)


# --- torch.save / torch.load and copy.deepcopy of fpga tensors -------------------------------------
# torch.save writes a storage's bytes after storage.cpu() (a copy through the device's set_
# kernel, registered in csrc/fpga/fpga_device.cpp) under a location tag; torch.load restores the
# tag through the registered deserializer. Tagger and deserializer for "fpga" are registered
# here. copy.deepcopy clones storages with torch.UntypedStorage(n, device=...), which PyTorch
# allows only for its own device types; for fpga storages the clone is a new fpga buffer object
# filled by a device-side copy instead. Other storages are untouched.


def _storage_tag(storage) -> Optional[str]:
    if storage.device.type == "fpga":
        return "fpga"
    return None


def _storage_restore(storage, location: str):
    if not location.startswith("fpga"):
        return None
    data = torch.empty(0, dtype=torch.uint8).set_(storage.untyped())
    return data.to("fpga").untyped_storage()


def _clone_storage(original):
    def clone(self):
        if self.device.type != "fpga":
            return original(self)
        fresh = torch.empty(self.nbytes(), dtype=torch.uint8, device="fpga").untyped_storage()
        return fresh.copy_(self)

    clone.__doc__ = original.__doc__
    clone._torch_memops_fpga = True
    return clone


torch.serialization.register_package(27, _storage_tag, _storage_restore)
if not getattr(torch.UntypedStorage.clone, "_torch_memops_fpga", False):
    torch.UntypedStorage.clone = _clone_storage(torch.UntypedStorage.clone)


def is_built_with_xrt() -> bool:
    """Whether this build of torch_memops contains the native XRT runtime."""
    return bool(torch.ops.memops_fpga.native_built())


def is_available() -> bool:
    """Whether a real FPGA card can run the kernels (native XRT built and a card found).

    ``fpga`` tensors work without one too, in emulation; :func:`backend` says which runs.
    """
    return is_built_with_xrt() and torch.ops.memops_fpga.native_device_count() > 0


def backend() -> str:
    """``"xrt"`` (a card through XRT) or ``"emulation"`` (HLS kernels compiled for the host).

    The choice is made once per process, at the first use of the fpga device:
    ``TORCH_MEMOPS_FPGA=xrt|emulation`` forces it; otherwise a card is used when present.
    """
    return str(torch.ops.memops_fpga.backend())


def device_name() -> str:
    """Name of the device the runtime drives (the card's, or that of the emulated U55C)."""
    return str(torch.ops.memops_fpga.device_name())


def load(xclbin: str | os.PathLike) -> None:
    """Load the xclbin that holds the memops kernels (built by ``make -C hls hw``).

    With ``backend() == "xrt"`` this programs the card and must happen before the first
    allocation on the fpga device. In emulation the file must exist and is recorded, but the
    kernels that run are always the host-compiled HLS sources.
    """
    torch.ops.memops_fpga.load_xclbin(os.fspath(xclbin))


def loaded_xclbin() -> Optional[str]:
    """Path of the loaded xclbin, or ``None``."""
    path = str(torch.ops.memops_fpga.loaded_xclbin())
    return path or None


def _pyxrt():
    try:
        import pyxrt  # type: ignore[import-not-found]
    except ImportError as e:
        raise RuntimeError(_PYXRT_MISSING) from e
    return pyxrt


def devices() -> list[str]:
    """BDFs of the XRT devices in this machine, through ``pyxrt``.

    Raises
    ------
    RuntimeError
        When ``pyxrt`` is not importable (it ships with XRT, not on PyPI).
    """
    pyxrt = _pyxrt()
    count = pyxrt.enumerate_devices()
    return [pyxrt.device(i).get_info(pyxrt.xrt_info_device.bdf) for i in range(count)]


def board_info(index: int = 0) -> dict[str, str]:
    """Name, BDF and loaded xclbin of XRT device ``index``, through ``pyxrt``.

    Raises
    ------
    RuntimeError
        When ``pyxrt`` is not importable.
    """
    pyxrt = _pyxrt()
    dev = pyxrt.device(index)
    info = pyxrt.xrt_info_device
    return {
        "name": str(dev.get_info(info.name)),
        "bdf": str(dev.get_info(info.bdf)),
        "xclbin_uuid": str(dev.get_xclbin_uuid().to_string()),
    }


def default_bank() -> int:
    """HBM bank that new fpga tensors are allocated in (0 unless changed)."""
    return int(torch.ops.memops_fpga.default_bank())


def set_default_bank(index: int) -> None:
    """Allocate new fpga tensors in HBM bank ``index`` (``0 .. 31``)."""
    torch.ops.memops_fpga.set_default_bank(index)


@contextlib.contextmanager
def bank(index: int) -> Iterator[None]:
    """Context manager: fpga tensors created inside are allocated in HBM bank ``index``."""
    previous = default_bank()
    set_default_bank(index)
    try:
        yield
    finally:
        set_default_bank(previous)


def empty(
    size: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    bank: Optional[int] = None,
    device_only: bool = False,
) -> Tensor:
    """An uninitialised fpga tensor in its own buffer object.

    Parameters
    ----------
    size, dtype
        As for ``torch.empty``.
    bank : int, optional
        HBM pseudo-channel ``0 .. 31`` (default: :func:`default_bank`).
    device_only : bool
        A buffer without a host copy (``xrt::bo::flags::device_only``): kernels may use it, but it
        cannot be mapped, synced or copied to the CPU.
    """
    index = default_bank() if bank is None else bank
    return torch.ops.memops_fpga.empty(list(size), dtype, index, device_only)


def bank_of(t: Tensor) -> int:
    """HBM bank of the buffer object behind the fpga tensor ``t``."""
    return int(torch.ops.memops_fpga.bank_of(t))


def sync(t: Tensor, direction: str) -> None:
    """Sync the bytes that ``t`` addresses: ``"to_device"`` or ``"from_device"``.

    Ordinary code never needs this (copies sync); it exposes the runtime for tests and for code
    that writes :func:`host_copy` directly.
    """
    torch.ops.memops_fpga.sync(t, direction)


def host_copy(t: Tensor) -> Tensor:
    """A CPU tensor aliasing the *host copy* of the fpga tensor ``t``, without any sync.

    The device copy is authoritative; the host copy is a staging area that holds whatever was
    last synced or written. Writing it changes nothing on the device until ``sync(t,
    "to_device")``; after a kernel wrote ``t`` it is stale until ``sync(t, "from_device")``.
    """
    return torch.ops.memops_fpga.host_copy(t)
