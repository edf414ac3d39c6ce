"""The ``"memops"`` attention function and mask, and the split Retrieval -> Apply path.

The attention function finds its cache layer through the module's ``layer_idx`` and the session
of the ``enable`` context that the module belongs to (``module._memops_session``): the session
knows the cache that the current forward updates (``session.active_cache``, set by
``MemopsCache.update``), and the layer marks that it received this forward's keys
(``pending_attention``), which a forward with another cache or none never sets.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torch_memops import ops

from .step_profile import NO_PROFILE

ATTENTION_NAME = "memops"
SESSION_ATTRIBUTE = "_memops_session"


def retrieve_and_apply(query: Tensor, keys: Tensor, values: Tensor, indices: Tensor, page_size: int,
                       seq_lens: Tensor, scale: float, apply_device: torch.device, profile=None) -> Tensor:
    """Retrieval on the memory device, transfer of the selected pages, Apply on ``apply_device``.

    ``keys``/``values``: ``[B, Hkv, S, D]`` on the memory device; ``indices``: ``int32 [B, Hkv, k]``
    from ``topk_relevancy`` with ``recent_pages >= 1``. Only ``k * page_size`` tokens per head
    cross. Because every head then selects the row's last (possibly partial) page, each row's
    gathered valid tokens form a prefix of one length across heads, which ``sparse_apply`` takes as
    ``seq_lens``. Returns ``[B, Hq, D]`` on ``apply_device``.
    """
    profile = profile or NO_PROFILE
    devices = (keys.device, apply_device)
    with profile.step("decode", "retrieval", devices):
        gathered_keys, lengths = ops.gather_retrieve(keys, indices, page_size, seq_lens=seq_lens)
        gathered_values, _ = ops.gather_retrieve(values, indices, page_size, seq_lens=seq_lens)
        for tensor in (gathered_keys, gathered_values, lengths):
            profile.moved(tensor, apply_device)
        gathered_keys, gathered_values = gathered_keys.to(apply_device), gathered_values.to(apply_device)
        lengths = lengths[:, 0].contiguous().to(apply_device)
    with profile.step("decode", "apply", devices):
        out, _ = ops.sparse_apply(query.to(apply_device), gathered_keys, gathered_values, None, page_size,
                                  seq_lens=lengths, scale=scale)
    return out


def cache_layer_for(module):
    """The MemopsLayer that received this forward's keys for ``module``, or ``None``."""
    session = getattr(module, SESSION_ATTRIBUTE, None)
    cache = None if session is None else session.active_cache
    if cache is None:
        return None
    layer = cache.layers[module.layer_idx]
    return layer if layer.pending_attention else None


def memops_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"memops"`` attention function (signature of transformers' ``AttentionInterface``).

    Multi-token forwards (prefill) and forwards without a :class:`MemopsCache` run transformers'
    SDPA attention; one-token forwards on a MemopsCache run the pipeline.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = cache_layer_for(module)
    if layer is not None:
        layer.pending_attention = False
    if layer is None or query.shape[2] > 1:
        output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, **kwargs)
        first_prefill = layer is not None and layer.just_prefilled
        if first_prefill:
            layer.just_prefilled = False
        if first_prefill and attention_mask is not None:
            # The last query row of the causal prefill mask marks exactly the row's valid tokens.
            layer.remove_left_padding(attention_mask[:, 0, -1, :].to(torch.bool))
        return output
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = layer.decode_attention(query[:, :, 0].contiguous(), scaling)
    return out[:, None], None
