"""Quest on a bound-preserving int8 summary: per-page min/max rounded outward to int8 codes with a
power-of-two scale per page (``prepare_memory(mode="minmax_int8")``), scored by the upper bound
of q.k. The bound is never below Quest's on the exact summary (``docs/design.md``), and scoring
reads little more than half the bytes of a 16-bit summary.

Storage: the cache allocates the summary as a ``[B, Hkv, N, 2, W]`` buffer in the keys' dtype,
``W`` elements holding ``D + 16`` bytes (``summary_dim``): per page, the first ``D`` bytes of
each of the two rows hold the min and max codes, the 4 bytes after the max codes the page's
float32 scale, the rest is padding that keeps every row 16-byte aligned for the kernels' vector
loads. So the cache's slicing, growing, device copies and reordering of the summary move codes
and scales together, and a page takes ``2 (D + 16)`` bytes: 56 % of Quest's 16-bit summary at
``D = 128``, which is what Relevancy reads (contiguously, page after page).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_memops import ops, reference

from ..rows import put_at_rows, take_at_rows
from .base import Method, SelectionInputs, newest_page_minmax


SCALE_ROW_BYTES = 16  # per summary row after the D code bytes: the scale (max row), padding


def packed_views(summary: Tensor) -> ops.QuantizedSummary:
    """The codes ``int8 [B, Hkv, N, 2, D]`` and scales ``float32 [B, Hkv, N]`` inside a summary
    buffer ``[B, Hkv, N, 2, W]`` of a 16- or 32-bit dtype whose rows hold ``D + 16`` bytes
    (``QuestInt8.summary_dim``; views: writes reach the buffer)."""
    row_bytes = summary.shape[-1] * summary.element_size()
    dim = row_bytes - SCALE_ROW_BYTES
    if summary.element_size() < 2 or dim <= 0 or dim % 4 != 0 or summary.stride(-1) != 1:
        raise ValueError(f"quest_int8: the summary buffer must be a 16- or 32-bit float tensor "
                         f"with a contiguous last dim of D + {SCALE_ROW_BYTES} bytes, D divisible by "
                         f"4, got {summary.dtype} {tuple(summary.shape)}")
    raw = summary.view(torch.int8)  # [B, Hkv, N, 2, D + 16]
    codes = raw[..., :dim]
    scales = raw[..., 1, dim:dim + 4].view(torch.float32).squeeze(-1)
    return ops.QuantizedSummary(codes, scales)


def page_record(summary: Tensor, page: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """Page ``page[b]`` of every row of ``summary`` with its codes (``int8 [B, Hkv, 2, D]``) and
    scale (``float32 [B, Hkv]``) replaced, as ``[B, Hkv, 2, W]`` of the summary's dtype; the
    other bytes of the page as they were.

    So that the decode write is one ``index_put_`` into the summary buffer itself: a write through
    an int8 view of the whole buffer (``packed_views``) compiles under inductor into copies of the
    whole summary and a copy back, per layer and step (the row write's ``scatter_`` problem of
    ``rows.py``). Dtype views of this one-page tensor are cheap.
    """
    dim = codes.shape[-1]
    raw = take_at_rows(summary, page).view(torch.int8)  # [B, Hkv, 2, D + 16]
    low = torch.cat((codes[:, :, 0], raw[:, :, 0, dim:]), dim=-1)
    high = torch.cat((codes[:, :, 1], float32_bytes(scales), raw[:, :, 1, dim + 4:]), dim=-1)
    return torch.stack((low, high), dim=2).view(summary.dtype)


def float32_bytes(values: Tensor) -> Tensor:
    """The four bytes of each float32 of ``values`` (``[...]`` -> ``int8 [..., 4]``), in memory
    order (little-endian, as ``packed_views`` reads them back).

    By shifts of the same-size int32 view and not ``values[..., None].view(torch.int8)``: inductor
    on CUDA may lay out that size-1 last dim with stride 0, which a dtype view of a smaller
    element refuses (``self.stride(-1) must be 1``; seen on an H200, torch 2.11).
    """
    bits = values.view(torch.int32)[..., None]
    shifts = 8 * torch.arange(4, device=values.device, dtype=torch.int32)
    return ((bits >> shifts) & 0xFF).to(torch.uint8).view(torch.int8)


class QuestInt8(Method):
    name = "quest_int8"
    summary_mode = "minmax_int8"

    def summary_dim(self, key_dim, dtype):
        size = dtype.itemsize
        if key_dim % 4 != 0 or size < 2:
            raise ValueError(f"quest_int8: keys of a 16- or 32-bit float dtype with a head dim divisible by "
                             f"4, got {dtype} and head dim {key_dim}")
        return (key_dim + SCALE_ROW_BYTES) // size

    def prepare(self, summary, keys, page_size, first_page, seq_lens):
        ops.prepare_memory_(packed_views(summary), keys, page_size, first_page, mode="minmax_int8",
                            seq_lens=seq_lens)

    def prepare_decode(self, summary, keys, page_size, seq_lens):
        # The exact min/max of each row's newest page (as Method.prepare_decode), quantised by
        # reference.quantize_minmax (pure tensor code, the kernels' codes and scales exactly).
        page, minmax = newest_page_minmax(keys, page_size, seq_lens)
        codes, scales = reference.quantize_minmax(minmax)  # [B, H, 2, D], [B, H]
        put_at_rows(summary, page, page_record(summary, page, codes, scales))

    def select(self, inputs: SelectionInputs):
        cfg = inputs.config
        _, indices = ops.topk_relevancy(inputs.query, packed_views(inputs.summary), inputs.budget_pages,
                                        mode="bound", num_pages=inputs.num_pages,
                                        sink_pages=cfg.sink_pages, recent_pages=cfg.recent_pages,
                                        group_reduce=cfg.group_reduce)
        return indices
