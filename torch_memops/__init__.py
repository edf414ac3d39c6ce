"""torch_memops: the memory-processing steps of long-context LLM inference as PyTorch operators.

Importing the package loads the compiled library, which registers ``torch.ops.memops.*`` for
every backend that was built, and the fake kernels used by ``torch.compile``.
"""

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against without an rpath)

from torch_memops import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
from torch_memops import fpga, ops
from torch_memops.ops import (
    gather_retrieve,
    merge_attention,
    prepare_memory,
    prepare_memory_,
    sparse_apply,
    topk_relevancy,
    topk_sparse_apply,
)

__version__ = "0.1.0"


def set_value_checks(enabled: bool) -> None:
    """Turn the checked mode of the device backends on or off (process-wide).

    Index, length and page-count values (``indices``, ``seq_lens``, ``num_pages``) live in
    tensors. The CPU always checks them and raises ``ValueError`` for an out-of-range value.
    Device backends do not read them back by default (that would be a host synchronisation and
    would break CUDA-graph capture); they apply one rule instead, so that nothing is read or
    written outside the tensors: a page index outside ``[0, N)`` is padding (never read),
    ``seq_lens`` is clamped to ``[0, S]`` and ``num_pages`` to ``[0, N]`` (``docs/design.md``).

    With checked mode on, the CUDA (and HIP) ops copy those values to the host before launching
    and raise the CPU's ``ValueError`` for them, writing nothing; this synchronises. It does
    not apply while the current stream is capturing a CUDA graph (the rule applies there).
    The environment variable ``MEMOPS_VALUE_CHECKS=1`` turns it on when the library loads.
    The fpga backend always checks (its ops are synchronous). Without checked mode, CUDA
    records which rule it applied in a device-side word: :func:`value_errors`.

    Examples
    --------
    >>> set_value_checks(True)
    >>> value_checks()
    True
    >>> set_value_checks(False)
    """
    torch.ops.memops_settings.set_value_checks(bool(enabled))


def value_checks() -> bool:
    """Whether the checked mode of :func:`set_value_checks` is on."""
    return bool(torch.ops.memops_settings.value_checks())


# Bits of the value-error word (csrc/include/memops/gpu_params.h) and the argument each names.
_VALUE_ERROR_BITS = {1: "indices", 2: "seq_lens", 4: "num_pages"}


def value_error_word(device=None) -> torch.Tensor:
    """The device-side value-error word of a CUDA device: an ``int32 [1]`` tensor.

    Without checked mode, a CUDA kernel that applies the out-of-range rule (see
    :func:`set_value_checks`) sets a bit of this word: 1 for a page index outside ``[-1, N)``,
    2 for ``seq_lens`` outside ``[0, S]``, 4 for ``num_pages`` outside ``[0, N]``. Nothing is
    synchronised: the word can be read or copied later, inside a captured CUDA graph too (call
    this once before capturing: the word is allocated on first use). :func:`value_errors` reads
    and clears it.
    """
    d = torch.device("cuda" if device is None else device)
    if d.type != "cuda":
        raise ValueError(f"value_error_word: `device` must be a CUDA device, got {d}")
    index = d.index if d.index is not None else torch.cuda.current_device()
    return torch.ops.memops_settings.value_error_word(index)


def value_errors(device=None, *, clear: bool = True) -> set:
    """The arguments whose out-of-range values the CUDA kernels of ``device`` met since the word
    was last cleared: a subset of ``{"indices", "seq_lens", "num_pages"}``.

    Reads :func:`value_error_word` (a synchronisation of the current stream) and, with
    ``clear``, zeroes it. Only CUDA records these; the CPU and the fpga raise instead.

    Examples
    --------
    >>> value_errors("cuda")  # doctest: +SKIP
    {'indices'}
    """
    word = value_error_word(device)
    bits = int(word.item())
    if clear and bits:
        word.zero_()
    return {name for bit, name in _VALUE_ERROR_BITS.items() if bits & bit}


__all__ = [
    "fpga",
    "ops",
    "set_value_checks",
    "value_checks",
    "value_error_word",
    "value_errors",
    "prepare_memory",
    "prepare_memory_",
    "topk_relevancy",
    "gather_retrieve",
    "sparse_apply",
    "merge_attention",
]
