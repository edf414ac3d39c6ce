"""Per-row writes into the static cache's buffers that stay in place under ``torch.compile``."""

from __future__ import annotations

import torch
from torch import Tensor


def put_at_rows(buffer: Tensor, positions: Tensor, values: Tensor) -> None:
    """``buffer[b, h, positions[b]] = values[b, h]`` for every row ``b`` and head ``h``, in place.

    ``buffer``: ``[B, H, L, ...]``; ``positions``: ``[B]`` (any integer dtype, on the buffer's
    device); ``values``: ``[B, H, ...]`` (the buffer's shape without dim 2).

    Written as ``index_put_`` and not ``scatter_``: inductor turns a compiled ``index_put_`` into
    a graph input back into an in-place write, but a ``scatter_`` into a copy of the whole buffer
    plus a copy back (on an H200, Llama-3-8B shapes, batch 8, 32K context, those two copies were
    28 ms of a 45 ms decode token: ``benchmarks/trace_e2e.py``).
    """
    buffer.index_put_(_row_index(buffer, positions), values)


def take_at_rows(buffer: Tensor, positions: Tensor) -> Tensor:
    """``buffer[b, h, positions[b]]`` for every row and head: ``[B, H, ...]``, a new tensor (the
    read that :func:`put_at_rows` writes back)."""
    return buffer[_row_index(buffer, positions)]


def _row_index(buffer: Tensor, positions: Tensor):
    """The advanced index of ``[b, h, positions[b]]`` for every row ``b`` and head ``h``."""
    batch, heads = buffer.shape[:2]
    rows = torch.arange(batch, device=buffer.device)[:, None]
    head_index = torch.arange(heads, device=buffer.device)[None, :]
    return rows, head_index, positions.to(torch.long)[:, None]
