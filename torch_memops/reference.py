"""Pure-PyTorch definition of every ``memops`` operator.

This file is the specification in code. It is written for clarity, not speed: plain loops over
batch rows, float32 (or the dtype asked for) arithmetic on upcast inputs. Tests compare every
backend against it, benchmarks use it as the eager baseline, and the HLS C-simulation testbenches read golden
vectors computed with it.

Semantics are those of ``docs/design.md`` section 2; the choices it leaves open are
recorded in its section 7.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "valid_lengths",
    "prepare_memory",
    "prepare_memory_",
    "quantize_minmax",
    "prepare_memory_int8",
    "prepare_memory_int8_",
    "relevancy_scores",
    "select_topk",
    "topk_relevancy",
    "gather_retrieve",
    "sparse_apply",
    "topk_sparse_apply",
    "merge_attention",
    "attention",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def valid_lengths(seq_lens: Optional[Tensor], batch: int, num_tokens: int) -> list[int]:
    """Valid token count of each batch row: ``seq_lens[b]`` (default: all ``num_tokens``)."""
    if seq_lens is None:
        return [num_tokens] * batch
    lens = [int(x) for x in seq_lens.tolist()]
    for b, n in enumerate(lens):
        if not 0 <= n <= num_tokens:
            raise ValueError(f"seq_lens[{b}] = {n} is outside [0, {num_tokens}]")
    return lens


# ------------------------------------------------------------------------------------------------
# 1. Prepare Memory
# ------------------------------------------------------------------------------------------------


def _page_summary(tokens: Tensor, mode: str, dtype: torch.dtype) -> Tensor:
    """Summary ``[R, D]`` of the valid tokens ``[T, Hkv..., D]`` of one page (``T`` may be 0)."""
    d = tokens.shape[-1]
    if mode == "minmax":
        if tokens.shape[0] == 0:
            return torch.zeros(2, d, dtype=dtype)
        return torch.stack([tokens.amin(0), tokens.amax(0)]).to(dtype)
    if tokens.shape[0] == 0:
        return torch.zeros(1, d, dtype=dtype)
    return tokens.float().mean(0, keepdim=True).to(dtype)


def prepare_memory(
    keys: Tensor, page_size: int, *, mode: str = "minmax", seq_lens: Optional[Tensor] = None
) -> Tensor:
    """Per-page summary ``[B, Hkv, N, R, D]`` of ``keys: [B, Hkv, S, D]``; ``N = ceil(S / P)``.

    ``minmax``: ``R = 2`` (index 0 = element-wise min, 1 = max) over the page's valid tokens.
    ``mean``: ``R = 1``, their float32 mean cast to the keys' dtype. Pages without a valid token
    are zero.
    """
    B, H, S, D = keys.shape
    n_pages = _ceil_div(S, page_size)
    summary = torch.zeros(B, H, n_pages, 2 if mode == "minmax" else 1, D, dtype=keys.dtype)
    prepare_memory_(summary, keys, page_size, 0, mode=mode, seq_lens=seq_lens)
    return summary


def prepare_memory_(
    summary: Tensor,
    keys: Tensor,
    page_size: int,
    first_page: int,
    *,
    mode: str = "minmax",
    seq_lens: Optional[Tensor] = None,
) -> Tensor:
    """Recompute pages ``first_page .. ceil(S/P) - 1`` of ``summary`` in place; others untouched.

    ``summary`` may hold more pages than ``keys`` covers (a preallocated buffer): pages at or past
    ``ceil(S / P)`` are left as they are.
    """
    B, H, S, D = keys.shape
    lens = valid_lengths(seq_lens, B, S)
    n_pages = _ceil_div(S, page_size)
    for b in range(B):
        for p in range(first_page, n_pages):
            t0, t1 = p * page_size, min((p + 1) * page_size, lens[b])
            page = keys[b, :, t0:max(t0, t1)].transpose(0, 1)  # [T, H, D]
            for h in range(H):
                summary[b, h, p] = _page_summary(page[:, h], mode, summary.dtype)
    return summary


INT8_CODE_MAX = 127


def quantize_minmax(summary: Tensor) -> Tuple[Tensor, Tensor]:
    """The bound-preserving int8 form of a minmax summary ``[..., N, 2, D]`` (float dtype).

    Returns ``codes: int8 [..., N, 2, D]`` and ``scales: float32 [..., N]``. For a page whose
    largest magnitude ``m = max_d max(|min_d|, |max_d|)`` is finite and non-zero, ``scale = 2^e``
    with ``e`` the smallest integer ``>= -149`` such that ``127 * 2^e >= m``;
    ``codes[..., 0, d] = floor(min_d / scale)`` and ``codes[..., 1, d] = ceil(max_d / scale)``,
    all in ``[-127, 127]``, so that (as real numbers) ``codes[0] * scale <= min`` and
    ``codes[1] * scale >= max``. A page with ``m == 0``: codes 0, scale 0. A page holding a NaN:
    codes 0, scale NaN. A page holding an infinity (no NaN): codes -127 / 127, scale +inf.
    Computed in float64, where every step here is exact.
    """
    x = summary.double()
    lo, hi = x[..., 0, :], x[..., 1, :]
    has_nan = torch.isnan(x).flatten(-2).any(-1)
    m = torch.maximum(lo.abs(), hi.abs()).amax(-1)
    m = torch.where(has_nan, torch.zeros_like(m), m)
    has_inf = torch.isinf(m)
    finite_m = torch.where(has_inf | (m == 0), torch.ones_like(m), m)
    mant, expo = torch.frexp(finite_m)  # m = mant * 2^expo, mant in [0.5, 1)
    e = torch.where(mant <= INT8_CODE_MAX / 128, expo - 7, expo - 6).clamp(min=-149)
    scale = torch.pow(2.0, e.double())
    a = torch.floor(lo / scale.unsqueeze(-1))
    b = torch.ceil(hi / scale.unsqueeze(-1))
    zero = (m == 0).unsqueeze(-1) | has_nan.unsqueeze(-1)
    inf = has_inf.unsqueeze(-1) & ~has_nan.unsqueeze(-1)
    a = torch.where(zero, 0.0, torch.where(inf, -INT8_CODE_MAX, a))
    b = torch.where(zero, 0.0, torch.where(inf, INT8_CODE_MAX, b))
    scale = torch.where(m == 0, 0.0, scale)
    scale = torch.where(has_inf, math.inf, scale)
    scale = torch.where(has_nan, math.nan, scale)
    codes = torch.stack([a, b], dim=-2).to(torch.int8)
    return codes, scale.float()


def prepare_memory_int8(
    keys: Tensor, page_size: int, *, seq_lens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``quantize_minmax`` of the exact minmax summary: ``(codes int8 [B, Hkv, N, 2, D],
    scales float32 [B, Hkv, N])``. Pages without a valid token have codes 0 and scale 0."""
    return quantize_minmax(prepare_memory(keys, page_size, mode="minmax", seq_lens=seq_lens))


def prepare_memory_int8_(
    summary: Tensor,
    scales: Tensor,
    keys: Tensor,
    page_size: int,
    first_page: int,
    *,
    seq_lens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Recompute pages ``first_page .. ceil(S/P) - 1`` of ``summary`` and ``scales`` in place."""
    n_pages = _ceil_div(keys.shape[2], page_size)
    if first_page < n_pages:
        codes, page_scales = prepare_memory_int8(keys, page_size, seq_lens=seq_lens)
        summary[:, :, first_page:n_pages] = codes[:, :, first_page:]
        scales[:, :, first_page:n_pages] = page_scales[:, :, first_page:]
    return summary, scales


# ------------------------------------------------------------------------------------------------
# 2. Compute Relevancy (+ top-k)
# ------------------------------------------------------------------------------------------------


def relevancy_scores(
    query: Tensor,
    summary: Tensor,
    *,
    mode: str = "bound",
    group_reduce: str = "max",
    weights: Optional[Tensor] = None,
    summary_scales: Optional[Tensor] = None,
) -> Tensor:
    """float32 score of every page for every kv head: ``[B, Hkv, N]`` (before top-k).

    An int8 ``summary`` (codes of :func:`quantize_minmax`, mode ``"bound"``) is scored on its
    codes and each page's group score is multiplied by ``summary_scales[b, kv, n]``:
    ``scale * reduce_g sum_d max(q_d * a_d, q_d * b_d)``.
    """
    if summary.dtype == torch.int8:
        codes_scores = relevancy_scores(query.float(), summary.float(), mode="bound",
                                        group_reduce=group_reduce)
        return summary_scales.float() * codes_scores
    q = query.float()
    s = summary.float()
    B, Hq, D = q.shape
    Hkv = s.shape[1]
    if mode == "indexer":
        # q: [B, Hi, D] index heads; s: [B, 1, N, 1, D] index keys; w: [B, Hi].
        logits = torch.einsum("bhd,bnd->bhn", q, s[:, 0, :, 0])
        return torch.einsum("bh,bhn->bn", weights.float(), logits.relu()).unsqueeze(1)
    G = Hq // Hkv
    qg = q.view(B, Hkv, G, 1, D)  # broadcast over pages
    if mode == "bound":
        lo, hi = s[:, :, None, :, 0], s[:, :, None, :, 1]  # [B, Hkv, 1, N, D]
        per_head = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, Hkv, G, N]
    else:  # dot
        per_head = torch.einsum("bkgxd,bknrd->bkgnr", qg, s).amax(-1)
    return per_head.amax(2) if group_reduce == "max" else per_head.sum(2)


def select_topk(
    scores: Tensor,
    k: int,
    *,
    num_pages: Optional[Tensor] = None,
    sink_pages: int = 0,
    recent_pages: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Exact top-k of ``scores: [B, H, N]`` with the rules of ``docs/design.md``.

    Only the first ``num_pages[b]`` pages are candidates. The first ``sink_pages`` and the last
    ``recent_pages`` valid pages are always taken and count toward ``k``; the rest of the budget
    goes to the highest scores, ties to the lower page index, NaN ranked as ``-inf``. The result
    is sorted by ascending page index and padded at the end with ``-1`` / ``-inf``.
    """
    B, H, N = scores.shape
    nvalid = [N] * B if num_pages is None else [int(x) for x in num_pages.tolist()]
    out_idx = torch.full((B, H, k), -1, dtype=torch.int32)
    out_score = torch.full((B, H, k), -math.inf, dtype=torch.float32)
    for b in range(B):
        nv = nvalid[b]
        forced = set(range(min(sink_pages, nv))) | set(range(max(nv - recent_pages, 0), nv))
        for h in range(H):
            row = torch.nan_to_num(scores[b, h, :nv].float(), nan=-math.inf)
            chosen = sorted(forced)[:k]
            # Stable descending sort puts the lower index first among equal scores.
            order = torch.sort(row, descending=True, stable=True).indices.tolist()
            rest = [p for p in order if p not in forced]
            chosen = sorted(chosen + rest[: max(k - len(chosen), 0)])
            out_idx[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            out_score[b, h, : len(chosen)] = scores[b, h, chosen].float()
    return out_score, out_idx


def topk_relevancy(
    query: Tensor,
    summary: Tensor,
    k: int,
    *,
    mode: str = "bound",
    num_pages: Optional[Tensor] = None,
    sink_pages: int = 0,
    recent_pages: int = 0,
    group_reduce: str = "max",
    weights: Optional[Tensor] = None,
    summary_scales: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Scores and the exact top-k page set: ``(float32 [B, Hkv, k], int32 [B, Hkv, k])``."""
    scores = relevancy_scores(query, summary, mode=mode, group_reduce=group_reduce, weights=weights,
                              summary_scales=summary_scales)
    return select_topk(
        scores, k, num_pages=num_pages, sink_pages=sink_pages, recent_pages=recent_pages
    )


# ------------------------------------------------------------------------------------------------
# 3. Retrieval
# ------------------------------------------------------------------------------------------------


def gather_retrieve(
    memory: Tensor, indices: Tensor, page_size: int, *, seq_lens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Copy the selected pages of ``memory: [B, H, S, D]`` into ``out: [B, H, k*P, D]``.

    Slot ``j`` of ``indices[b, h]`` fills rows ``j*P .. j*P + P - 1`` of ``out[b, h]`` with the
    valid tokens of that page; padding slots (``-1``) and invalid tokens are zero. ``lengths[b, h]``
    counts the valid tokens copied. With ascending indices padded at the end, they form a prefix.
    """
    B, H, S, D = memory.shape
    k = indices.shape[-1]
    lens = valid_lengths(seq_lens, B, S)
    out = torch.zeros(B, H, k * page_size, D, dtype=memory.dtype)
    lengths = torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for j, p in enumerate(indices[b, h].tolist()):
                if p < 0:
                    continue
                t0, t1 = p * page_size, min((p + 1) * page_size, lens[b])
                if t1 > t0:
                    out[b, h, j * page_size : j * page_size + t1 - t0] = memory[b, h, t0:t1]
                    lengths[b, h] += t1 - t0
    return out, lengths


# ------------------------------------------------------------------------------------------------
# 4. Apply to Inference
# ------------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dtype=torch.float32):
    """Softmax attention of one query ``[D]`` over ``k, v: [T, D]``; returns ``(out, lse)``."""
    if k.shape[0] == 0:
        return torch.zeros(v.shape[-1], dtype=dtype), -math.inf
    logits = (k.to(dtype) @ q.to(dtype)) * scale
    lse = torch.logsumexp(logits, 0)
    return torch.softmax(logits, 0) @ v.to(dtype), float(lse)


def _selected_tokens(index_row: Optional[list[int]], page_size: int, length: int) -> list[int]:
    if index_row is None:
        return list(range(length))
    tokens = []
    for p in index_row:
        if p >= 0:
            tokens.extend(range(p * page_size, min((p + 1) * page_size, length)))
    return tokens


def sparse_apply(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Optional[Tensor],
    page_size: int,
    *,
    seq_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """Decode attention over the tokens of the selected pages (all valid tokens if ``None``).

    ``indices`` is ``[B, Hkv, k]`` (one selection per GQA group) or ``[B, Hq, k]``. Returns
    ``out: [B, Hq, D]`` in the query dtype and ``lse: float32 [B, Hq]`` (natural log of the sum of
    ``exp(scale * q.k)``); a row with no token gives zeros and ``-inf``.
    """
    B, Hq, D = query.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    lens = valid_lengths(seq_lens, B, S)
    G = Hq // Hkv
    out = torch.zeros(B, Hq, v_cache.shape[-1], dtype=compute_dtype)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float32)
    for b in range(B):
        for h in range(Hq):
            kv = h // G
            row = None
            if indices is not None:
                row = indices[b, h if indices.shape[1] == Hq else kv].tolist()
            tok = torch.tensor(_selected_tokens(row, page_size, lens[b]), dtype=torch.long)
            o, l = attention(query[b, h], k_cache[b, kv, tok], v_cache[b, kv, tok], scale,
                             compute_dtype)
            out[b, h], lse[b, h] = o, l
    return out.to(query.dtype), lse


def topk_sparse_apply(
    query: Tensor,
    summary: Tensor,
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
    summary_scales: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`topk_relevancy`, then :func:`sparse_apply` over its selection:
    ``(out, lse, scores, indices)``."""
    scores, indices = topk_relevancy(query, summary, k, mode=mode, num_pages=num_pages,
                                     sink_pages=sink_pages, recent_pages=recent_pages,
                                     group_reduce=group_reduce, summary_scales=summary_scales)
    out, lse = sparse_apply(query, k_cache, v_cache, indices, page_size, seq_lens=seq_lens, scale=scale)
    return out, lse, scores, indices


def merge_attention(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> Tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint token sets.

    ``out_*: [..., D]``, ``lse_*: float32 [...]``. ``lse = log(exp(lse_a) + exp(lse_b))``;
    ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``; both empty gives ``0, -inf``;
    a part with ``lse = +inf`` takes all the weight (two such parts share it equally) and
    ``lse = +inf``; a NaN ``lse`` gives a NaN row.
    """
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(la - safe), torch.zeros_like(lse))
    wb = torch.where(finite, torch.exp(lb - safe), torch.zeros_like(lse))
    # An lse of +inf takes all the weight (two share it); a NaN lse makes the row NaN.
    inf_a, inf_b = (la == math.inf).float(), (lb == math.inf).float()
    dominated = (inf_a + inf_b) > 0
    wa = torch.where(dominated, inf_a / (inf_a + inf_b), wa)
    wb = torch.where(dominated, inf_b / (inf_a + inf_b), wb)
    lse = torch.where(dominated, math.inf, lse)
    nan = torch.isnan(la) | torch.isnan(lb)
    wa, wb, lse = (torch.where(nan, math.nan, x) for x in (wa, wb, lse))
    out = wa.unsqueeze(-1) * out_a.float() + wb.unsqueeze(-1) * out_b.float()
    return out.to(out_a.dtype), lse
