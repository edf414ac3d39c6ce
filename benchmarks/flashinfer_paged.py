"""Our cache as FlashInfer paged KV, without a copy, and the FlashInfer rows of the benchmarks.

The mapping: keys/values ``[B, Hkv, S, D]`` (contiguous, ``S`` a multiple of the page size ``P``)
are viewed as ``[B * Hkv * N, P, 1, D]`` NHD pages (``N = S / P``); each (batch row, kv head)
is one FlashInfer request with ``num_kv_heads = 1`` whose query heads are that head's GQA group
(the query ``[B, Hq, D]`` viewed as ``[B * Hkv, G, D]``); page ``index`` of row ``b``, head ``h``
is page id ``(b * Hkv + h) * N + index``. ``paged_decode_torch`` computes what FlashInfer
computes from those arrays in plain PyTorch, so that the mapping is tested on the CPU
(tests/test_benchmarks.py) against ``reference.sparse_apply``.

Everything that needs FlashInfer imports it lazily; ``flashinfer_version()`` is ``None`` when it
is absent, and the benchmarks then skip the FlashInfer rows and say so.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor


def flashinfer_version() -> Optional[str]:
    """The installed FlashInfer's version, or ``None`` when ``import flashinfer`` fails."""
    try:
        import flashinfer
    except Exception:  # ImportError, or a broken install failing at import: both mean "absent"
        return None
    return getattr(flashinfer, "__version__", "unknown")


def paged_view(cache: Tensor, page_size: int) -> Tensor:
    """``[B, Hkv, S, D]`` -> ``[B * Hkv * N, P, 1, D]``, the same memory (raises if it would copy)."""
    if cache.dim() != 4:
        raise ValueError(f"paged_view: cache must be [B, Hkv, S, D], got shape {tuple(cache.shape)}")
    B, H, S, D = cache.shape
    if S % page_size != 0:
        raise ValueError(f"paged_view: S ({S}) must be a multiple of page_size ({page_size})")
    if not cache.is_contiguous():
        raise ValueError("paged_view: cache must be contiguous (a strided view would need a copy)")
    return cache.view(B * H * (S // page_size), page_size, 1, D)


def grouped_query(query: Tensor, num_kv_heads: int) -> Tensor:
    """``[B, Hq, D]`` -> ``[B * Hkv, G, D]``: kv head ``h`` serves query heads ``h*G .. h*G+G-1``."""
    B, Hq, D = query.shape
    return query.reshape(B * num_kv_heads, Hq // num_kv_heads, D)


def page_table(indices: Tensor, pages_per_row: int, page_size: int,
               seq_lens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """FlashInfer's ``(indptr, page ids, last_page_len)`` for our ``indices [B, Hkv, k]``.

    ``indices`` are ascending page indices padded with ``-1`` at the end, as ``topk_relevancy``
    returns them; ``seq_lens [B]`` the valid tokens per row (default: every page full). A request
    whose last selected page is its row's partial last page gets that page's length as
    ``last_page_len``; every other page is full. A request with no page keeps zero pages. All on
    ``indices.device``, int32; this reads the data (host sync), as FlashInfer's ``plan`` does.
    """
    B, H, k = indices.shape
    device = indices.device
    indices = indices.long()
    valid = indices >= 0
    base = (torch.arange(B * H, device=device) * pages_per_row).view(B, H, 1)
    ids = (indices + base)[valid].int()
    counts = valid.sum(-1).view(-1)
    indptr = torch.zeros(B * H + 1, dtype=torch.int32, device=device)
    indptr[1:] = counts.cumsum(0)
    last_page_len = torch.full((B * H,), page_size, dtype=torch.int32, device=device)
    if seq_lens is not None:
        lens = seq_lens.to(device).long().view(B, 1).expand(B, H).reshape(-1)
        last_index = indices.view(B * H, k).gather(1, (counts - 1).clamp(min=0).view(-1, 1)).view(-1)
        row_pages = (lens + page_size - 1) // page_size
        partial = (counts > 0) & (last_index == row_pages - 1)
        tail = lens - (row_pages - 1) * page_size
        last_page_len = torch.where(partial, tail, last_page_len).int()
    return indptr, ids, last_page_len


def full_page_table(batch: int, num_kv_heads: int, pages_per_row: int, page_size: int,
                    device) -> tuple[Tensor, Tensor, Tensor]:
    """The page table of dense decode: every page of every (row, kv head), full pages."""
    requests = batch * num_kv_heads
    indptr = (torch.arange(requests + 1, device=device) * pages_per_row).int()
    ids = torch.arange(requests * pages_per_row, device=device, dtype=torch.int32)
    return indptr, ids, torch.full((requests,), page_size, dtype=torch.int32, device=device)


def paged_decode_torch(query: Tensor, key_pages: Tensor, value_pages: Tensor, indptr: Tensor, ids: Tensor,
                       last_page_len: Tensor, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """What FlashInfer's paged decode computes, in float32 PyTorch (one request at a time).

    ``query [R, G, D]``, pages ``[num_pages, P, 1, D]``; returns ``out [R, G, D]`` (float32) and the
    natural-log ``lse [R, G]`` (``-inf`` and zeros for a request without tokens).
    """
    R, G, D = query.shape
    P = key_pages.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(R, G, D, dtype=torch.float32, device=query.device)
    lse = torch.full((R, G), -math.inf, dtype=torch.float32, device=query.device)
    for r in range(R):
        pages = ids[int(indptr[r]):int(indptr[r + 1])].long()
        if pages.numel() == 0:
            continue
        tokens = pages.numel() * P - (P - int(last_page_len[r]))
        keys = key_pages[pages, :, 0].reshape(-1, D)[:tokens].float()
        values = value_pages[pages, :, 0].reshape(-1, D)[:tokens].float()
        logits = query[r].float() @ keys.T * scale
        lse[r] = torch.logsumexp(logits, dim=-1)
        out[r] = torch.softmax(logits, dim=-1) @ values
    return out, lse


class FlashInferDecode:
    """A ``BatchDecodeWithPagedKVCacheWrapper`` over our cache with a fixed page table.

    ``plan`` runs once (host work); ``run()`` is the decode alone, capturable in a CUDA graph.
    With ``cuda_graph=True`` the wrapper keeps its page ids in ``self.ids`` (a buffer of ours),
    so a captured pipeline writes new ids there before ``run``.
    """

    def __init__(self, query: Tensor, keys: Tensor, values: Tensor, page_size: int, indptr: Tensor, ids: Tensor,
                 last_page_len: Tensor, *, use_tensor_cores: bool, cuda_graph: bool = True,
                 scale: Optional[float] = None, workspace_mib: int = 128):
        import flashinfer

        B, Hq, D = query.shape
        Hkv = keys.shape[1]
        self.q = grouped_query(query, Hkv)
        self.k_pages, self.v_pages = paged_view(keys, page_size), paged_view(values, page_size)
        self.workspace = torch.zeros(workspace_mib << 20, dtype=torch.uint8, device=query.device)
        kwargs = {}
        if cuda_graph:
            self.indptr, self.ids, self.last = indptr.clone(), ids.clone(), last_page_len.clone()
            kwargs = dict(paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.ids,
                          paged_kv_last_page_len_buffer=self.last)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=cuda_graph, use_tensor_cores=use_tensor_cores, **kwargs)
        self.wrapper.plan(indptr, ids, last_page_len, Hq // Hkv, 1, D, page_size,
                          q_data_type=query.dtype, kv_data_type=keys.dtype,
                          sm_scale=D ** -0.5 if scale is None else scale)
        self.shape = (B, Hq, D)

    def run(self) -> tuple[Tensor, Tensor]:
        """``out [B, Hq, D]`` and FlashInfer's lse (base 2) ``[B, Hq]``."""
        out, lse = self.wrapper.run(self.q, (self.k_pages, self.v_pages), return_lse=True)
        B, Hq, D = self.shape
        return out.view(B, Hq, D), lse.view(B, Hq)


def bound_scores(query: Tensor, summary: Tensor, sink_pages: int, recent_pages: int) -> Tensor:
    """Quest bound per page, GQA max over the group, ``[B, Hkv, N]`` float32; the first
    ``sink_pages`` and last ``recent_pages`` pages get ``+inf`` so that any top-k keeps them."""
    B, Hq, D = query.shape
    Hkv, N = summary.shape[1], summary.shape[2]
    q = query.float().view(B, Hkv, Hq // Hkv, 1, D)
    lo, hi = summary[:, :, None, :, 0].float(), summary[:, :, None, :, 1].float()
    scores = torch.maximum(q * lo, q * hi).sum(-1).amax(2)
    page = torch.arange(N, device=query.device)
    forced = (page < sink_pages) | (page >= N - recent_pages)
    return scores.masked_fill(forced, math.inf)


def flashinfer_pipeline(query: Tensor, summary: Tensor, keys: Tensor, values: Tensor, page_size: int,
                        budget_pages: int, *, sink_pages: int, recent_pages: int,
                        use_tensor_cores: bool, compile: bool = True) -> Callable[[], Tensor]:
    """The Quest step assembled from peers: torch.compile'd bound scoring, ``flashinfer.top_k``
    (unsorted; FlashInfer does not need sorted pages) and FlashInfer's paged decode. Returns a
    callable for one step, meant to be captured in a CUDA graph."""
    import flashinfer

    B, Hq, D = query.shape
    Hkv, N = keys.shape[1], keys.shape[2] // page_size
    requests = B * Hkv
    indptr = (torch.arange(requests + 1, device=query.device) * budget_pages).int()
    ids = torch.arange(requests * budget_pages, device=query.device, dtype=torch.int32)
    last = torch.full((requests,), page_size, dtype=torch.int32, device=query.device)
    decode = FlashInferDecode(query, keys, values, page_size, indptr, ids, last,
                              use_tensor_cores=use_tensor_cores, cuda_graph=True)
    base = (torch.arange(requests, device=query.device) * N).view(-1, 1)
    scores = torch.compile(bound_scores, dynamic=False) if compile else bound_scores

    def step():
        s = scores(query, summary, sink_pages, recent_pages).view(requests, N)
        _, top = flashinfer.top_k(s, budget_pages)
        decode.ids.copy_((top + base).view(-1))
        return decode.run()[0]

    return step


def compare_outputs(ours: Tensor, theirs: Tensor, truth: Tensor) -> dict:
    """Max abs errors of ours and FlashInfer against a float32 truth, and their difference.
    ``agree``: ours is at most twice FlashInfer's error (plus 1e-3 for rounding of a bf16 output)."""
    ours_err = (ours.float() - truth).abs().max().item()
    fi_err = (theirs.float() - truth).abs().max().item()
    return {"ours_err": round(ours_err, 5), "fi_err": round(fi_err, 5),
            "ours_vs_fi": round((ours.float() - theirs.float()).abs().max().item(), 5),
            "agree": bool(ours_err <= 2 * fi_err + 1e-3)}


def decode_same_pages(query: Tensor, keys: Tensor, values: Tensor, indices: Tensor, page_size: int,
                      use_tensor_cores: bool):
    """FlashInfer's decode over the pages that ``indices`` (``[B, Hkv, k]``) select from our cache,
    run once and checked against ``sparse_apply`` on the same pages and a float32 truth:
    ``(decode, check)``; ``decode.run`` is what a benchmark times."""
    from torch_memops import ops

    batch, q_heads, dim = query.shape
    table = page_table(indices, keys.shape[2] // page_size, page_size)
    decode = FlashInferDecode(query, keys, values, page_size, *table, use_tensor_cores=use_tensor_cores)
    theirs, _ = decode.run()
    ours, _ = ops.sparse_apply(query, keys, values, indices, page_size)
    truth, _ = paged_decode_torch(grouped_query(query, keys.shape[1]), decode.k_pages, decode.v_pages, *table)
    return decode, compare_outputs(ours, theirs, truth.view(batch, q_heads, dim))
