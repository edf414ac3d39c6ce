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
)

__version__ = "0.1.0"

__all__ = [
    "fpga",
    "ops",
    "prepare_memory",
    "prepare_memory_",
    "topk_relevancy",
    "gather_retrieve",
    "sparse_apply",
    "merge_attention",
]
