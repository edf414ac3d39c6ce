"""A CPU-side check that a block of code makes no host synchronisation.

On a GPU a host sync is a device-to-host read: ``Tensor.item()``, ``int(t)``, ``bool(t)``,
``float(t)``, ``t.tolist()``, ``t.cpu()``, ``t.numpy()``, indexing a Python sequence with a
tensor, or an op whose output shape depends on data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``), and a tensor made from host data (``torch.tensor``,
``torch.as_tensor``, ``Tensor.new_tensor``: a copy from pageable host memory, which the host
waits for; ``set_sync_debug_mode("error")`` rejects it on the GPU). On the CPU none of these synchronise, so they go unnoticed there.
:func:`forbid_host_sync` makes each of them raise, at two levels: Python calls on tensors
(a ``TorchFunctionMode``) and dispatcher ops, which C++ code reaches too (a
``TorchDispatchMode``: ``aten._local_scalar_dense`` is what every scalar read becomes), and
copies between devices. What it cannot see: a C++ kernel that reads a tensor's memory through a
raw pointer on the host (harmless on the CPU; the GPU check, ``tools/gpu_hf.sh``, runs with
``torch.cuda.set_sync_debug_mode("error")``).
"""

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FORBIDDEN_METHODS = {"item", "tolist", "cpu", "numpy", "__int__", "__bool__", "__float__", "__index__", "__array__",
                     "new_tensor", "tensor", "as_tensor"}
FORBIDDEN_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
                 "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::argwhere"}


class HostSyncError(AssertionError):
    pass


class _ForbidMethods(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in FORBIDDEN_METHODS:
            raise HostSyncError(f"host sync: Tensor.{name} called in a region that must not synchronise")
        return func(*args, **(kwargs or {}))


class _ForbidOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        if name in FORBIDDEN_OPS:
            raise HostSyncError(f"host sync: {name} (a scalar read or a data-dependent shape) in a region that "
                                "must not synchronise")
        if name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
            raise HostSyncError(f"host sync: {name} with a boolean mask (a data-dependent shape) in a region "
                                "that must not synchronise")
        out = func(*args, **(kwargs or {}))
        devices = {t.device for t in (*args, *(kwargs or {}).values(), out) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            raise HostSyncError(f"host sync: {name} moves data between {sorted(map(str, devices))}")
        return out


@contextmanager
def forbid_host_sync():
    """Raise :class:`HostSyncError` on any host synchronisation in the block; yields the list of
    dispatcher ops seen (so that a test can check the block did run the code it meant to)."""
    ops = _ForbidOps()
    with _ForbidMethods(), ops:
        yield ops.ops
