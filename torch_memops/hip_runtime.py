"""HIP events and host-memory registration through hip-python, for what PyTorch has no call for.

On a ROCm build of PyTorch, ``torch.cuda`` events and streams are HIP's, so the profiler's GPU path
needs nothing from here. This module covers the rest on AMD GPUs: timing work on a raw HIP stream
that PyTorch does not own, and ``hipHostRegister`` of host memory that PyTorch did not allocate
(e.g. the host side of XRT buffers), so that the GPU can copy from it asynchronously. hip-python
(``pip install hip-python``; module ``hip``) is imported on first use only; every HIP error is
raised as a ``RuntimeError`` that names the call and the error. No AMD GPU has run this code: the
tests exercise it against hip-python's API on a machine without one (every call then reports
``hipErrorNoDevice``) and against a stand-in module for the success path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["hip_module", "device_count", "HipEventTimer", "host_register"]

_MISSING = "hip-python is not importable (pip install hip-python; it needs the ROCm HIP runtime)"


def hip_module():
    """hip-python's ``hip`` module, or ``None`` when it cannot be imported."""
    try:
        from hip import hip
    except ImportError:
        return None
    return hip


def _require():
    hip = hip_module()
    if hip is None:
        raise RuntimeError(_MISSING)
    return hip


def _error_name(err) -> str:
    return getattr(err, "name", None) or str(err)


def _ok(hip, err) -> bool:
    return err == hip.hipError_t.hipSuccess


def _check(hip, call: str, result):
    """hip-python returns ``(err, value...)`` or ``(err,)``; raise on an error, return the values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, *values = result
    if not _ok(hip, err):
        raise RuntimeError(f"torch_memops.hip_runtime: {call} failed: {_error_name(err)}")
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> tuple[int, Optional[str]]:
    """``(AMD GPUs found, why none)``: ``(0, reason)`` without hip-python, a runtime or a device."""
    hip = hip_module()
    if hip is None:
        return 0, _MISSING
    err, count = hip.hipGetDeviceCount()
    if not _ok(hip, err):
        return 0, f"hipGetDeviceCount: {_error_name(err)}"
    return int(count), None if count else "hipGetDeviceCount: 0 devices"


class HipEventTimer:
    """Elapsed time between two HIP events recorded on ``stream`` (a hip-python stream or ``None``,
    the null stream): ``start()``, the work, ``stop()``, then ``seconds()`` (waits for the stop event)."""

    def __init__(self, stream=None):
        self._hip = _require()
        self.stream = stream
        self._start = _check(self._hip, "hipEventCreate", self._hip.hipEventCreate())
        self._stop = _check(self._hip, "hipEventCreate", self._hip.hipEventCreate())

    def start(self) -> None:
        _check(self._hip, "hipEventRecord", self._hip.hipEventRecord(self._start, self.stream))

    def stop(self) -> None:
        _check(self._hip, "hipEventRecord", self._hip.hipEventRecord(self._stop, self.stream))

    def seconds(self) -> float:
        _check(self._hip, "hipEventSynchronize", self._hip.hipEventSynchronize(self._stop))
        return float(_check(self._hip, "hipEventElapsedTime",
                            self._hip.hipEventElapsedTime(self._start, self._stop))) / 1e3

    def close(self) -> None:
        for event in (self._start, self._stop):
            _check(self._hip, "hipEventDestroy", self._hip.hipEventDestroy(event))


@contextlib.contextmanager
def host_register(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Page-lock a contiguous CPU tensor's memory for the GPU (``hipHostRegister``) inside the context."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"host_register: tensor must be a contiguous CPU tensor, got device {tensor.device}, "
                         f"contiguous={tensor.is_contiguous()}")
    hip = _require()
    nbytes = tensor.numel() * tensor.element_size()
    _check(hip, "hipHostRegister", hip.hipHostRegister(tensor.data_ptr(), nbytes, hip.hipHostRegisterDefault))
    try:
        yield tensor
    finally:
        _check(hip, "hipHostUnregister", hip.hipHostUnregister(tensor.data_ptr()))
