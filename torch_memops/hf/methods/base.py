"""The method interface: a method is its page summary, its Prepare and its Relevancy.

A method subclasses :class:`Method`, sets ``name`` and ``summary_mode`` and implements
:meth:`Method.select`; ``methods/__init__.py`` registers it. The cache calls :meth:`Method.prepare`
on the prefill (and on multi-token chunks), :meth:`Method.prepare_decode` after each decode token
and :meth:`Method.select` in each decode step of a sparse layer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from torch_memops import ops

from ..rows import put_at_rows

if TYPE_CHECKING:
    from ..config import MemopsConfig

# prepare_memory mode -> representatives per page (R of the summary)
SUMMARY_REPRESENTATIVES = {"minmax": 2, "mean": 1, "minmax_int8": 2}


@dataclasses.dataclass
class SelectionInputs:
    """What a method sees in one decode step of one sparse layer.

    ``keys`` is the layer's key buffer ``[B, Hkv, S, D]`` (a static cache passes its whole
    capacity; only each row's first ``seq_lens[b]`` tokens are valid). ``summary`` is
    ``[B, Hkv, N, R, D]`` on the relevancy device (``None`` when the method has no summary), of
    which each row's first ``num_pages[b]`` pages are valid.
    """

    query: Tensor
    keys: Tensor
    summary: Optional[Tensor]
    seq_lens: Tensor
    num_pages: Tensor
    budget_pages: int
    page_size: int
    scale: float
    config: "MemopsConfig"
    layer_idx: int


def newest_page_tokens(keys: Tensor, page_size: int, seq_lens: Tensor):
    """The page holding each row's newest token: ``(page [B], tokens [B, H, P, D], valid [B, 1, P, 1])``.

    ``seq_lens`` counts the newest token; positions past a row's length (or the buffer's end)
    are gathered clamped and marked invalid. Pure tensor code, no host synchronisation.
    """
    batch, heads, capacity, dim = keys.shape
    lens = seq_lens.to(torch.long)
    page = (lens - 1).div(page_size, rounding_mode="floor")
    positions = page[:, None] * page_size + torch.arange(page_size, device=keys.device)
    valid = (positions < lens[:, None])[:, None, :, None]
    index = positions.clamp(max=capacity - 1)[:, None, :, None].expand(batch, heads, page_size, dim)
    return page, keys.gather(2, index), valid


def newest_page_minmax(keys: Tensor, page_size: int, seq_lens: Tensor):
    """``(page [B], [B, H, 2, D])``: the exact min and max of each row's newest page."""
    page, tokens, valid = newest_page_tokens(keys, page_size, seq_lens)
    # masked_fill with a Python scalar: a new_tensor fill value would be a host-to-device copy
    low = tokens.masked_fill(~valid, float("inf")).amin(dim=2)
    high = tokens.masked_fill(~valid, float("-inf")).amax(dim=2)
    return page, torch.stack((low, high), dim=2)


class Method:
    """Base class of the selection methods of the registry.

    Attributes
    ----------
    name : str
        Registry key (``MemopsConfig(method=name)``).
    summary_mode : str or None
        ``prepare_memory`` mode of the page summary (``"minmax"``, ``"mean"``), or ``None``: the
        method keeps no summary.
    compileable : bool
        Whether :meth:`select` runs without host synchronisation, so that a static cache can be
        compiled and captured with it (an evaluation-only oracle may say ``False``).
    """

    name: str = ""
    summary_mode: Optional[str] = "minmax"
    compileable: bool = True
    #: Whether :meth:`select_and_apply` runs this method's Relevancy, top-k and Apply as one op.
    fuses_apply: bool = False

    @property
    def representatives(self) -> int:
        """``R`` of the summary (0 without one)."""
        return 0 if self.summary_mode is None else SUMMARY_REPRESENTATIVES[self.summary_mode]

    def summary_dim(self, key_dim: int, dtype: torch.dtype) -> int:
        """The last dim of the summary buffer ``[B, Hkv, N, R, summary_dim]`` (in ``dtype``, the
        keys' dtype) for keys of ``key_dim``: ``key_dim`` unless the method packs its summary."""
        return key_dim

    def prepare(self, summary: Tensor, keys: Tensor, page_size: int, first_page: int, seq_lens: Tensor) -> None:
        """Prepare Memory after a prefill or a chunk: recompute pages ``first_page ..`` in place."""
        ops.prepare_memory_(summary, keys, page_size, first_page, mode=self.summary_mode, seq_lens=seq_lens)

    def prepare_decode(self, summary: Tensor, keys: Tensor, page_size: int, seq_lens: Tensor) -> None:
        """Prepare Memory after a decode token: recompute the page holding each row's newest token.

        ``seq_lens`` already counts the new token. Pure tensor code with no host synchronisation
        (the page differs per row), so a compiled or captured decode step can run it; it gives
        the summary of :func:`torch_memops.ops.prepare_memory` for that page (minmax exactly,
        mean up to float32 summation order).
        """
        if self.summary_mode == "minmax":
            page, page_summary = newest_page_minmax(keys, page_size, seq_lens)
        else:
            page, tokens, valid = newest_page_tokens(keys, page_size, seq_lens)
            total = torch.where(valid, tokens.float(), 0.0).sum(dim=2)
            count = valid.sum(dim=2).clamp(min=1)
            page_summary = (total / count).to(summary.dtype)[:, :, None]
        put_at_rows(summary, page, page_summary)

    def select(self, inputs: SelectionInputs) -> Optional[Tensor]:
        """Relevancy + top-k: ``int32 [B, Hkv, k]`` (or ``[B, Hq, k]``) page indices, ascending,
        ``-1`` padded at the end, ``k = inputs.budget_pages``; or ``None``: every valid token."""
        raise NotImplementedError(f"method {self.name!r} does not implement select()")

    def select_and_apply(self, inputs: SelectionInputs, values: Tensor) -> Tuple[Tensor, Tensor]:
        """Relevancy + top-k + Apply in one op (methods with ``fuses_apply``): ``(out [B, Hq, D],
        indices)``, the attention of ``inputs.query`` over the pages :meth:`select` would choose, of
        ``inputs.keys`` and ``values`` with ``inputs.seq_lens`` valid tokens a row."""
        raise NotImplementedError(f"method {self.name!r} does not fuse Relevancy with Apply")


class TopkMethod(Method):
    """A method whose Relevancy + top-k is one ``topk_relevancy`` call on its summary with
    ``score_mode`` (Quest's bound, the mean keys' dot product): its decode step can run as one
    ``topk_sparse_apply`` (one kernel launch on CUDA)."""

    score_mode: str = "bound"
    fuses_apply = True

    def topk_options(self, inputs: SelectionInputs) -> dict:
        cfg = inputs.config
        return dict(mode=self.score_mode, num_pages=inputs.num_pages, sink_pages=cfg.sink_pages,
                    recent_pages=cfg.recent_pages, group_reduce=cfg.group_reduce)

    def select(self, inputs: SelectionInputs) -> Tensor:
        _, indices = ops.topk_relevancy(inputs.query, inputs.summary, inputs.budget_pages,
                                        **self.topk_options(inputs))
        return indices

    def select_and_apply(self, inputs: SelectionInputs, values: Tensor) -> Tuple[Tensor, Tensor]:
        step = ops.topk_sparse_apply(inputs.query, inputs.summary, inputs.keys, values, inputs.budget_pages,
                                     inputs.page_size, seq_lens=inputs.seq_lens, scale=inputs.scale,
                                     **self.topk_options(inputs))
        return step.out, step.indices
