"""Typed wrappers of ``torch.ops.memops.*`` and their fake kernels (for ``torch.compile``).

Every op follows ``docs/design.md`` section 2; ``torch_memops.reference`` holds the same
functions in plain PyTorch. The ops have no backward: with grad mode on, an input that
requires grad raises (call them under ``torch.no_grad()`` or ``torch.inference_mode()``).
Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``S`` cached tokens, ``D``
head dim, ``P`` page size, ``N = ceil(S / P)`` pages, ``R`` representatives per page, ``k`` pages
selected. Keys and values use the Hugging Face layout ``[B, Hkv, S, D]`` and may be strided views
of a larger buffer (only the last dim must be contiguous); nothing is copied.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "QuantizedSummary",
    "prepare_memory",
    "prepare_memory_",
    "topk_relevancy",
    "gather_retrieve",
    "sparse_apply",
    "topk_sparse_apply",
    "TopkApplyResult",
    "merge_attention",
]


class QuantizedSummary(NamedTuple):
    """A bound-preserving int8 minmax summary, as ``prepare_memory(..., mode="minmax_int8")``
    returns it and :func:`topk_relevancy` (mode ``"bound"``) takes it.

    ``codes: int8 [B, Hkv, N, 2, D]`` (``R = 0`` min codes ``a``, ``R = 1`` max codes ``b``) and
    ``scales: float32 [B, Hkv, N]``, one power of two per page. As real numbers
    ``a * scale <= min`` and ``b * scale >= max`` of the page's keys, so the int8 bound is never
    below the exact one; ``torch_memops.reference.quantize_minmax`` defines the rounding and the
    special pages (no valid token or all zero: scale 0; a NaN key: scale NaN; an infinite key:
    codes -127 / 127, scale +inf). Half the bytes of a 16-bit summary (plus 4 bytes a page).

    Examples
    --------
    >>> keys = torch.randn(1, 2, 64, 32)
    >>> q8 = prepare_memory(keys, 16, mode="minmax_int8")
    >>> exact = prepare_memory(keys, 16)
    >>> bool((q8.codes[:, :, :, 0] * q8.scales[..., None] <= exact[:, :, :, 0]).all())
    True
    """

    codes: Tensor
    scales: Tensor


SummaryLike = Union[Tensor, QuantizedSummary]


def prepare_memory(
    keys: Tensor, page_size: int, *, mode: str = "minmax", seq_lens: Optional[Tensor] = None
) -> SummaryLike:
    """Summarise the keys of every page (Prepare Memory).

    Parameters
    ----------
    keys : Tensor
        ``[B, Hkv, S, D]``, float32, float16 or bfloat16; last dim contiguous.
    page_size : int
        Tokens per page ``P`` (> 0).
    mode : {"minmax", "mean", "minmax_int8"}
        ``"minmax"``: ``R = 2`` (element-wise min, then max, over the page's valid tokens;
        exact). ``"mean"``: ``R = 1``, the mean with float32 accumulation. ``"minmax_int8"``:
        the minmax summary rounded outward to int8 codes with a power-of-two scale per page
        (:class:`QuantizedSummary`; ``torch.ops.memops.prepare_memory_int8``).
    seq_lens : Tensor, optional
        ``int32 [B]``, valid tokens per row (default ``S``); tokens past it are never read.

    Returns
    -------
    Tensor or QuantizedSummary
        ``summary: [B, Hkv, N, R, D]`` in the dtype of ``keys``; pages with no valid token are 0.
        For ``"minmax_int8"``: ``QuantizedSummary(codes int8 [B, Hkv, N, 2, D], scales float32
        [B, Hkv, N])``.

    Examples
    --------
    >>> keys = torch.randn(1, 8, 1000, 128)
    >>> prepare_memory(keys, 16).shape
    torch.Size([1, 8, 63, 2, 128])
    >>> q8 = prepare_memory(keys, 16, mode="minmax_int8")
    >>> q8.codes.dtype, q8.codes.shape, q8.scales.shape
    (torch.int8, torch.Size([1, 8, 63, 2, 128]), torch.Size([1, 8, 63]))
    """
    if mode == "minmax_int8":
        return QuantizedSummary(*torch.ops.memops.prepare_memory_int8(keys, page_size,
                                                                      seq_lens=seq_lens))
    return torch.ops.memops.prepare_memory(keys, page_size, mode=mode, seq_lens=seq_lens)


def prepare_memory_(
    summary: SummaryLike,
    keys: Tensor,
    page_size: int,
    first_page: int,
    *,
    mode: str = "minmax",
    seq_lens: Optional[Tensor] = None,
) -> SummaryLike:
    """Recompute pages ``first_page .. ceil(S/P) - 1`` of ``summary`` in place.

    One call per decode step (``first_page`` = the page that received the new token) keeps the
    summary of a growing cache current. ``summary: [B, Hkv, N_max, R, D]`` may be a preallocated
    buffer with ``N_max >= ceil(S / P)``; pages outside the range are not touched. Other
    arguments as in :func:`prepare_memory`. With ``mode="minmax_int8"``, ``summary`` is a
    :class:`QuantizedSummary` (codes ``[B, Hkv, N_max, 2, D]``, scales ``[B, Hkv, N_max]``) whose
    two tensors are updated (``torch.ops.memops.prepare_memory_int8_``). Returns ``summary``.

    Examples
    --------
    >>> keys = torch.randn(1, 2, 40, 64)
    >>> summary = torch.zeros(1, 2, 8, 2, 64)
    >>> _ = prepare_memory_(summary, keys, 16, 0)
    >>> torch.equal(summary[:, :, :3], prepare_memory(keys, 16))
    True
    >>> q8 = QuantizedSummary(torch.zeros(1, 2, 8, 2, 64, dtype=torch.int8), torch.zeros(1, 2, 8))
    >>> _ = prepare_memory_(q8, keys, 16, 0, mode="minmax_int8")
    >>> torch.equal(q8.scales[:, :, :3], prepare_memory(keys, 16, mode="minmax_int8").scales)
    True
    """
    if mode == "minmax_int8":
        codes, scales = summary
        torch.ops.memops.prepare_memory_int8_(codes, scales, keys, page_size, first_page,
                                              seq_lens=seq_lens)
        return summary
    torch.ops.memops.prepare_memory_(
        summary, keys, page_size, first_page, summary_mode=mode, seq_lens=seq_lens
    )
    return summary


def topk_relevancy(
    query: Tensor,
    summary: SummaryLike,
    k: int,
    *,
    mode: str = "bound",
    num_pages: Optional[Tensor] = None,
    sink_pages: int = 0,
    recent_pages: int = 0,
    group_reduce: str = "max",
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Score every page against the decode query and select the top ``k`` (Relevancy + top-k).

    Parameters
    ----------
    query : Tensor
        ``[B, Hq, D]`` (one decode token), dtype of ``summary``.
    summary : Tensor or QuantizedSummary
        ``[B, Hkv, N, R, D]`` from :func:`prepare_memory`; ``Hq % Hkv == 0``. A
        :class:`QuantizedSummary` (``mode="minmax_int8"``) is scored in mode ``"bound"`` with
        any float query dtype: ``scale * reduce_g sum_d max(q_d a_d, q_d b_d)`` per page, never
        below the bound of the exact summary (see ``docs/design.md``).
    k : int
        Pages to select per kv head (> 0); may exceed ``N`` (the result is then padded).
    mode : {"bound", "dot", "indexer"}
        ``"bound"``: Quest's upper bound ``sum_d max(q_d*min_d, q_d*max_d)`` (``R == 2``).
        ``"dot"``: ``max_r <q, rep_r>``. ``"indexer"`` (DeepSeek's lightning indexer): ``query``
        holds ``Hi`` index heads, ``summary`` is ``[B, 1, N, 1, D]`` index keys, and the score is
        ``sum_h weights[b, h] * relu(<q_h, key>)``.
    num_pages : Tensor, optional
        ``int32 [B]``: only the first ``num_pages[b]`` pages are candidates (default ``N``).
    sink_pages, recent_pages : int
        The first ``sink_pages`` and last ``recent_pages`` valid pages are always selected; they
        count toward ``k`` (``sink_pages + recent_pages <= k``).
    group_reduce : {"max", "sum"}
        How the ``Hq // Hkv`` query-head scores of a kv head are combined, so that one selection
        serves the whole GQA group.
    weights : Tensor, optional
        ``[B, Hi]`` head weights; required by, and only allowed with, ``mode="indexer"``.

    Returns
    -------
    scores : Tensor
        ``float32 [B, Hkv, k]`` aligned with ``indices``; ``-inf`` for padding.
    indices : Tensor
        ``int32 [B, Hkv, k]``: the exact top-k page set (ties go to the lower page index, NaN
        ranks lowest), in ascending page order, padded with ``-1`` at the end.

    Examples
    --------
    >>> keys = torch.randn(1, 2, 256, 64)
    >>> summary = prepare_memory(keys, 16)
    >>> scores, indices = topk_relevancy(torch.randn(1, 8, 64), summary, 4, recent_pages=1)
    >>> indices.shape, int(indices[0, 0, -1])
    (torch.Size([1, 2, 4]), 15)
    >>> q8 = prepare_memory(keys, 16, mode="minmax_int8")
    >>> topk_relevancy(torch.randn(1, 8, 64), q8, 4)[1].shape
    torch.Size([1, 2, 4])
    """
    summary_scales = None
    if isinstance(summary, (tuple, list)):
        summary, summary_scales = summary
    return torch.ops.memops.topk_relevancy(
        query,
        summary,
        k,
        mode=mode,
        num_pages=num_pages,
        sink_pages=sink_pages,
        recent_pages=recent_pages,
        group_reduce=group_reduce,
        weights=weights,
        summary_scales=summary_scales,
    )


def gather_retrieve(
    memory: Tensor, indices: Tensor, page_size: int, *, seq_lens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Copy the selected pages of ``memory`` back to back (Retrieval).

    Parameters
    ----------
    memory : Tensor
        ``[B, H, S, D]`` keys, values or any per-token data (any dtype; bit-exact copy).
    indices : Tensor
        ``int32 [B, H, k]`` as returned by :func:`topk_relevancy`; ``-1`` marks padding.
    page_size : int
        Tokens per page ``P``.
    seq_lens : Tensor, optional
        ``int32 [B]`` valid tokens per row.

    Returns
    -------
    out : Tensor
        ``[B, H, k*P, D]``: slot ``j`` holds the valid tokens of page ``indices[..., j]`` in rows
        ``j*P ..``; everything else is zero. With ascending indices padded at the end, the valid
        tokens form a prefix of length ``lengths``.
    lengths : Tensor
        ``int32 [B, H]``, the number of valid tokens copied.

    Examples
    --------
    >>> mem = torch.randn(1, 1, 40, 4)
    >>> out, n = gather_retrieve(mem, torch.tensor([[[0, 2]]], dtype=torch.int32), 16)
    >>> out.shape, int(n)
    (torch.Size([1, 1, 32, 4]), 24)
    """
    return torch.ops.memops.gather_retrieve(memory, indices, page_size, seq_lens=seq_lens)


def sparse_apply(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Optional[Tensor],
    page_size: int,
    *,
    seq_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Decode attention over the tokens of the selected pages, gathered in the kernel (Apply).

    Parameters
    ----------
    query : Tensor
        ``[B, Hq, D]``.
    k_cache, v_cache : Tensor
        ``[B, Hkv, S, D]``, dtype of ``query``; strided views of a larger buffer are fine.
    indices : Tensor or None
        ``int32 [B, Hkv, k]`` (one selection per GQA group) or ``[B, Hq, k]``; ``None`` attends
        to every valid token (dense decode through the same kernel).
    page_size : int
        Tokens per page ``P``.
    seq_lens : Tensor, optional
        ``int32 [B]`` valid tokens per row.
    scale : float, optional
        Softmax scale, default ``D ** -0.5``; a finite number > 0 (NaN, inf, 0 and negative
        scales raise ``ValueError``).

    Returns
    -------
    out : Tensor
        ``[B, Hq, D]`` in the query dtype (float32 accumulation).
    lse : Tensor
        ``float32 [B, Hq]``: natural-log log-sum-exp of the scaled scores. A row with no valid
        token gives ``out = 0`` and ``lse = -inf``.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    >>> out, lse = sparse_apply(q, k, v, None, 16)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 64]), torch.Size([1, 4]))
    """
    return torch.ops.memops.sparse_apply(
        query, k_cache, v_cache, indices, page_size, seq_lens=seq_lens, scale=scale
    )


class TopkApplyResult(NamedTuple):
    """What :func:`topk_sparse_apply` returns: the attention and the selection it attended.

    Examples
    --------
    >>> keys = torch.randn(1, 1, 32, 8)
    >>> out, lse, scores, indices = topk_sparse_apply(torch.randn(1, 2, 8), prepare_memory(keys, 16),
    ...                                               keys, keys, 1, 16)
    >>> out.shape, indices.shape
    (torch.Size([1, 2, 8]), torch.Size([1, 1, 1]))
    """

    out: Tensor
    lse: Tensor
    scores: Tensor
    indices: Tensor


def topk_sparse_apply(
    query: Tensor,
    summary: SummaryLike,
    k_cache: Tensor,
    v_cache: Tensor,
    k: int,
    page_size: int,
    *,
    mode: str = "bound",
    num_pages: Optional[Tensor] = None,
    seq_lens: Optional[Tensor] = None,
    sink_pages: int = 0,
    recent_pages: int = 0,
    group_reduce: str = "max",
    scale: Optional[float] = None,
) -> TopkApplyResult:
    """The decode step of a layer in one op: :func:`topk_relevancy`, then :func:`sparse_apply`
    over the pages it selected (Relevancy + top-k + Apply).

    Exactly ``scores, indices = topk_relevancy(query, summary, k, mode=mode, num_pages=num_pages,
    sink_pages=sink_pages, recent_pages=recent_pages, group_reduce=group_reduce)`` followed by
    ``out, lse = sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens=seq_lens,
    scale=scale)``, and every backend runs those two ops. On CUDA, ``MEMOPS_CUDA_FUSED_STEP=1``
    runs it as one kernel launch instead (16-bit tensors, D of 64 or 128, up to 8 query heads a
    kv head, up to 8192 pages, a 16-bit summary): the same selection, the attention within
    float32 rounding; opt-in because the H200 measured it slower than the two ops in a CUDA
    graph (``docs/cuda.md``).

    Parameters
    ----------
    query, summary, k, mode, num_pages, sink_pages, recent_pages, group_reduce
        As :func:`topk_relevancy`; ``mode`` is ``"bound"`` or ``"dot"`` (page scores).
    k_cache, v_cache, page_size, seq_lens, scale
        As :func:`sparse_apply`. ``k_cache`` has the ``B`` and ``Hkv`` of ``summary`` and holds
        every page of it (``N <= ceil(S / page_size)``).

    Returns
    -------
    TopkApplyResult
        ``(out, lse, scores, indices)``: ``out [B, Hq, D]`` and ``lse float32 [B, Hq]`` as
        :func:`sparse_apply` returns them, ``scores float32 [B, Hkv, k]`` and ``indices int32
        [B, Hkv, k]`` as :func:`topk_relevancy` returns them.

    Examples
    --------
    >>> keys, values = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    >>> q = torch.randn(1, 8, 64)
    >>> step = topk_sparse_apply(q, prepare_memory(keys, 16), keys, values, 4, 16, recent_pages=1)
    >>> step.out.shape, step.indices.shape, int(step.indices[0, 0, -1])
    (torch.Size([1, 8, 64]), torch.Size([1, 2, 4]), 15)
    """
    summary_scales = None
    if isinstance(summary, (tuple, list)):
        summary, summary_scales = summary
    return TopkApplyResult(*torch.ops.memops.topk_sparse_apply(
        query, summary, k_cache, v_cache, k, page_size, mode=mode, num_pages=num_pages,
        seq_lens=seq_lens, sink_pages=sink_pages, recent_pages=recent_pages,
        group_reduce=group_reduce, scale=scale, summary_scales=summary_scales))


def merge_attention(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> Tuple[Tensor, Tensor]:
    """Exactly combine two partial attentions over disjoint token sets.

    ``out_a, out_b: [..., D]`` (same shape and dtype, last dim contiguous), ``lse_a, lse_b:
    float32 [...]``. Returns ``(out, lse)`` with ``lse = logaddexp(lse_a, lse_b)``; two empty
    parts give ``0`` and ``-inf``; a part with ``lse = +inf`` takes all the weight (two such parts
    share it equally) and ``lse = +inf``; a NaN ``lse`` gives a NaN row.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 2, 32), torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    >>> a = sparse_apply(q, k[:, :, :40], v[:, :, :40], None, 8)
    >>> b = sparse_apply(q, k[:, :, 40:], v[:, :, 40:], None, 8)
    >>> out, lse = merge_attention(*a, *b)
    >>> torch.allclose(out, sparse_apply(q, k, v, None, 8)[0], atol=1e-5)
    True
    """
    return torch.ops.memops.merge_attention(out_a, lse_a, out_b, lse_b)


# ------------------------------------------------------------------------------------------------
# Fake kernels: output metadata only, so that torch.compile can trace the ops. The full argument
# checking happens in the real kernels (csrc/validate.cpp), which run at execution time. The fakes
# repeat the checks that they need to compute output shapes (ranks, scalars) and the device mix,
# with csrc/validate.cpp's messages, so that under torch.compile(fullgraph=True) or
# FakeTensorMode a bad argument raises what an eager call raises. The dispatcher sends any call
# that involves a meta tensor to these functions, so a meta tensor mixed with real ones would
# otherwise pass unnoticed.
# ------------------------------------------------------------------------------------------------

#: Token and page counts are int32 in the kernels (csrc/validate.cpp, kMaxCount).
MAX_COUNT = 2**31 - 1


def _check_dim(op: str, name: str, t: Tensor, dim: int, layout: str) -> None:
    """Raises like csrc/validate.cpp's check_dim unless ``t`` has ``dim`` dims."""
    if t.dim() != dim:
        raise RuntimeError(f"memops.{op}: `{name}` must have {dim} dims {layout}, got {t.dim()} "
                           f"dims {list(t.shape)}")


def _check_same_device(op: str, **tensors: Optional[Tensor]) -> None:
    """Raises like csrc/validate.cpp unless all given tensors are on the first one's device."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    ref_name, ref = present[0]
    for name, t in present[1:]:
        if t.device != ref.device:
            raise RuntimeError(
                f"memops.{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                "move both to the device that runs this step"
            )


def _check_scalars(op: str, *, page_size=None, k=None, first_page=None, sink_pages=0,
                   recent_pages=0, **choices: tuple[str, tuple[str, ...]]) -> None:
    """The scalar checks of csrc/validate.cpp, with its messages, for the fake kernels: under
    torch.compile or FakeTensorMode a bad argument raises the same ValueError as an eager call
    (the fake kernels also compute output shapes from these values)."""
    if page_size is not None and page_size <= 0:
        raise ValueError(f"memops.{op}: `page_size` must be > 0, got {page_size}")
    if page_size is not None and page_size > MAX_COUNT:
        raise ValueError(f"memops.{op}: `page_size` must be <= 2^31 - 1 ({MAX_COUNT}, token counts "
                         f"are int32), got {page_size}")
    if first_page is not None and first_page < 0:
        raise ValueError(f"memops.{op}: `first_page` must be >= 0, got {first_page}")
    if k is not None:
        if k <= 0:
            raise ValueError(f"memops.{op}: `k` must be > 0, got {k}")
        if k > MAX_COUNT:
            raise ValueError(f"memops.{op}: `k` must be <= 2^31 - 1 ({MAX_COUNT}, page indices are "
                             f"int32), got {k}")
        if sink_pages < 0 or recent_pages < 0:
            raise ValueError(f"memops.{op}: `sink_pages` and `recent_pages` must be >= 0, got "
                             f"{sink_pages} and {recent_pages}")
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            quoted = [f'"{a}"' for a in allowed]
            options = ", ".join(quoted[:-1]) + " or " + quoted[-1]
            raise ValueError(f'memops.{op}: `{name}` must be {options}, got "{value}"')


def _check_selected_tokens(op: str, indices: Tensor, page_size: int) -> None:
    k = indices.shape[-1]
    if k > MAX_COUNT // page_size:
        raise ValueError(f"memops.{op}: `indices` selects k * page_size = {k} * {page_size} tokens "
                         f"per row, more than 2^31 - 1 ({MAX_COUNT}, token counts are int32)")


@torch.library.register_fake("memops::prepare_memory")
def _prepare_memory_fake(keys, page_size, *, mode="minmax", seq_lens=None):
    _check_dim("prepare_memory", "keys", keys, 4, "[B, Hkv, S, D]")
    _check_same_device("prepare_memory", keys=keys, seq_lens=seq_lens)
    _check_scalars("prepare_memory", page_size=page_size, mode=(mode, ("minmax", "mean")))
    B, H, S, D = keys.shape
    reps = 2 if mode == "minmax" else 1
    return keys.new_empty(B, H, (S + page_size - 1) // page_size, reps, D)


@torch.library.register_fake("memops::prepare_memory_")
def _prepare_memory_inplace_fake(summary, keys, page_size, first_page, *, summary_mode="minmax",
                                 seq_lens=None):
    _check_dim("prepare_memory_", "keys", keys, 4, "[B, Hkv, S, D]")
    _check_dim("prepare_memory_", "summary", summary, 5, "[B, Hkv, N, R, D]")
    _check_same_device("prepare_memory_", keys=keys, summary=summary, seq_lens=seq_lens)
    _check_scalars("prepare_memory_", page_size=page_size, first_page=first_page,
                   mode=(summary_mode, ("minmax", "mean")))
    return None


@torch.library.register_fake("memops::prepare_memory_int8")
def _prepare_memory_int8_fake(keys, page_size, *, seq_lens=None):
    _check_same_device("prepare_memory_int8", keys=keys, seq_lens=seq_lens)
    _check_scalars("prepare_memory_int8", page_size=page_size)
    B, H, S, D = keys.shape
    n = (S + page_size - 1) // page_size
    return (keys.new_empty(B, H, n, 2, D, dtype=torch.int8),
            keys.new_empty(B, H, n, dtype=torch.float32))


@torch.library.register_fake("memops::prepare_memory_int8_")
def _prepare_memory_int8_inplace_fake(summary, scales, keys, page_size, first_page, *,
                                      seq_lens=None):
    _check_same_device("prepare_memory_int8_", keys=keys, summary=summary, scales=scales,
                       seq_lens=seq_lens)
    _check_scalars("prepare_memory_int8_", page_size=page_size, first_page=first_page)
    return None


@torch.library.register_fake("memops::topk_relevancy")
def _topk_relevancy_fake(query, summary, k, *, mode="bound", num_pages=None, sink_pages=0,
                         recent_pages=0, group_reduce="max", weights=None, summary_scales=None,
                         op="topk_relevancy"):
    _check_dim(op, "query", query, 3, "[B, Hq, D]")
    _check_dim(op, "summary", summary, 5, "[B, Hkv, N, R, D]")
    _check_same_device(op, query=query, summary=summary, num_pages=num_pages,
                       weights=weights, summary_scales=summary_scales)
    _check_scalars(op, k=k, sink_pages=sink_pages, recent_pages=recent_pages,
                   mode=(mode, ("bound", "dot", "indexer")),
                   group_reduce=(group_reduce, ("max", "sum")))
    B, Hkv = summary.shape[0], summary.shape[1]
    return (query.new_empty(B, Hkv, k, dtype=torch.float32),
            query.new_empty(B, Hkv, k, dtype=torch.int32))


@torch.library.register_fake("memops::gather_retrieve")
def _gather_retrieve_fake(memory, indices, page_size, *, seq_lens=None):
    _check_dim("gather_retrieve", "memory", memory, 4, "[B, H, S, D]")
    _check_dim("gather_retrieve", "indices", indices, 3, "[B, H, k]")
    _check_same_device("gather_retrieve", memory=memory, indices=indices, seq_lens=seq_lens)
    _check_scalars("gather_retrieve", page_size=page_size)
    _check_selected_tokens("gather_retrieve", indices, page_size)
    B, H, _, D = memory.shape
    k = indices.shape[-1]
    return memory.new_empty(B, H, k * page_size, D), indices.new_empty(B, H)


@torch.library.register_fake("memops::sparse_apply")
def _sparse_apply_fake(query, k_cache, v_cache, indices, page_size, *, seq_lens=None, scale=None,
                       op="sparse_apply"):
    _check_dim(op, "query", query, 3, "[B, Hq, D]")
    _check_dim(op, "k_cache", k_cache, 4, "[B, Hkv, S, D]")
    _check_dim(op, "v_cache", v_cache, 4, "[B, Hkv, S, D]")
    _check_same_device(op, query=query, k_cache=k_cache, v_cache=v_cache,
                       indices=indices, seq_lens=seq_lens)
    _check_scalars(op, page_size=page_size)
    if indices is not None and indices.dim() == 3:
        _check_selected_tokens(op, indices, page_size)
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"memops.{op}: `scale` must be a finite number > 0 (default D ** "
                         f"-0.5), got {scale}")
    B, Hq, D = query.shape
    return query.new_empty(B, Hq, D), query.new_empty(B, Hq, dtype=torch.float32)


@torch.library.register_fake("memops::topk_sparse_apply")
def _topk_sparse_apply_fake(query, summary, k_cache, v_cache, k, page_size, *, mode="bound",
                            num_pages=None, seq_lens=None, sink_pages=0, recent_pages=0,
                            group_reduce="max", scale=None, summary_scales=None):
    if mode not in ("bound", "dot"):
        raise ValueError(f"memops.topk_sparse_apply: `mode` must be 'bound' or 'dot' (page scores; "
                         f"the indexer selects tokens: call topk_relevancy and sparse_apply), got "
                         f"'{mode}'")
    _check_same_device("topk_sparse_apply", query=query, summary=summary, k_cache=k_cache,
                       v_cache=v_cache, num_pages=num_pages, seq_lens=seq_lens,
                       summary_scales=summary_scales)
    scores, indices = _topk_relevancy_fake(query, summary, k, mode=mode, num_pages=num_pages,
                                           sink_pages=sink_pages, recent_pages=recent_pages,
                                           group_reduce=group_reduce, summary_scales=summary_scales,
                                           op="topk_sparse_apply")
    out, lse = _sparse_apply_fake(query, k_cache, v_cache, None, page_size, seq_lens=seq_lens,
                                  scale=scale, op="topk_sparse_apply")
    return out, lse, scores, indices


@torch.library.register_fake("memops::merge_attention")
def _merge_attention_fake(out_a, lse_a, out_b, lse_b):
    if out_a.dim() < 1:
        raise RuntimeError("memops.merge_attention: `out_a` must have at least 1 dim [..., D]")
    _check_same_device("merge_attention", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)
