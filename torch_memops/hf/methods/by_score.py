"""Shared pieces of the evaluation selectors: top-k of given page scores, true attention mass.

:func:`select_by_scores` turns any ``[B, H, N]`` page scores into the selection that
``topk_relevancy`` makes (the same rules: sink and recent pages forced and counted in ``k``, ties
to the lower page, ascending, ``-1`` padded) by running that op on the scores themselves: a
one-dimensional "dot" score of a query of ones against a summary holding the scores is the score,
exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_memops import ops

from .base import SelectionInputs


def select_by_scores(scores: Tensor, inputs: SelectionInputs) -> Tensor:
    """``int32 [B, H, k]``: the top ``inputs.budget_pages`` of ``scores: float32 [B, H, N]``."""
    cfg = inputs.config
    scores = scores.float().contiguous()
    ones = scores.new_ones(scores.shape[0], scores.shape[1], 1)
    num_pages = inputs.num_pages
    if num_pages is None:  # methods without a summary are not given page counts
        num_pages = (inputs.seq_lens + (inputs.page_size - 1)) // inputs.page_size
    _, indices = ops.topk_relevancy(ones, scores[:, :, :, None, None], inputs.budget_pages, mode="dot",
                                    num_pages=num_pages.to(scores.device, torch.int32), sink_pages=cfg.sink_pages,
                                    recent_pages=cfg.recent_pages, group_reduce="max")
    return indices


def page_count(inputs: SelectionInputs) -> int:
    """Pages ``N`` that the key buffer spans (each row's first ``num_pages[b]`` are valid)."""
    return -(-inputs.keys.shape[2] // inputs.page_size)


def attention_page_mass(inputs: SelectionInputs) -> Tensor:
    """``float32 [B, Hq, N]``: softmax attention of each query head summed over each page's tokens.

    Dense scores of the decode query against every valid key (what full attention computes);
    tokens at or past ``seq_lens[b]`` get no mass. A row without valid tokens has mass 0.
    """
    keys = inputs.keys
    valid = torch.arange(keys.shape[2], device=keys.device)[None, :] < inputs.seq_lens.to(keys.device, torch.long)[:, None]
    return softmax_page_mass(inputs.query, keys, valid[:, None, None, :], inputs.scale, inputs.page_size)


def softmax_page_mass(query: Tensor, keys: Tensor, valid: Tensor, scale: float, page_size: int) -> Tensor:
    """``float32 [B, Hq, ceil(T / P)]``: each query head's softmax over the ``valid`` tokens of
    ``keys [B, Hkv, T, D]`` (``valid``: bool, broadcastable to ``[B, Hkv, 1, T]``), summed per run of
    ``page_size`` tokens. A head with no valid token has mass 0."""
    batch, query_heads, dim = query.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    group = query_heads // kv_heads
    logits = torch.einsum("bkgd,bksd->bkgs", query.float().view(batch, kv_heads, group, dim), keys.float())
    logits = (logits * scale).masked_fill(~valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    pages = -(-tokens // page_size)
    padded = torch.nn.functional.pad(probs, (0, pages * page_size - tokens))
    return padded.view(batch, kv_heads, group, pages, page_size).sum(-1).view(batch, query_heads, pages)


def group_reduce(per_head: Tensor, kv_heads: int, how: str) -> Tensor:
    """``[B, Hq, N] -> [B, Hkv, N]``: the GQA group's ``G`` query-head rows reduced by ``max`` or ``sum``."""
    batch, query_heads, pages = per_head.shape
    grouped = per_head.view(batch, kv_heads, query_heads // kv_heads, pages)
    return grouped.amax(2) if how == "max" else grouped.sum(2)


def per_query_head_summary(summary: Tensor, query_heads: int) -> Tensor:
    """``[B, Hkv, N, R, D] -> [B, Hq, N, R, D]``: each kv head's summary repeated for its query heads."""
    return summary.repeat_interleave(query_heads // summary.shape[1], dim=1)
