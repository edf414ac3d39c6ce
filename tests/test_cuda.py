"""CUDA backend of every memops op against ``torch_memops.reference`` (fresh random data each run).

Tolerances: data movement (prepare_memory minmax, gather_retrieve) is compared bit-exact. Scores
and attention are compared with the reference evaluated in float64 on the same (upcast) inputs.
The kernels accumulate in float32, so float32 results agree to ~1e-5 relative; float16 and
bfloat16 outputs are rounded once to their dtype, so they agree to a few units of the dtype's
epsilon (2^-10 and 2^-7). Selections are checked exactly on integer-valued data (every score is
an exactly representable sum, so ties are real and must go to the lower page index) and by the
tie-tolerant set rule on random data (see ``assert_valid_selection``).
"""

from __future__ import annotations

import math

import pytest
import torch

import torch_memops
from torch_memops import ops, reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not torch._C._dispatch_has_kernel_for_dispatch_key("memops::sparse_apply", "CUDA"),
        reason="torch_memops was built without its CUDA kernels (CPU torch or no nvcc)",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerance per dtype: one rounding of the output to the dtype plus float32 accumulation.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Scores are float32 sums of D products of dtype values (exact in float32); only the summation
# order differs from the float64 reference.
SCORE_RTOL = 1e-5

DEV = "cuda"


def strided_view(t: torch.Tensor, extra: int = 5) -> torch.Tensor:
    """The same values as ``t`` [B, H, S, D], as ``buf[:, :, :S]`` of a larger poisoned buffer."""
    B, H, S, D = t.shape
    poison = float("nan") if t.dtype.is_floating_point else 77
    buf = torch.full((B, H, S + extra, D), poison, dtype=t.dtype, device=t.device)
    buf[:, :, :S] = t
    return buf[:, :, :S]


def integer_tensor(*shape, dtype, low=-4, high=5):
    return torch.randint(low, high, shape, device=DEV).to(dtype)


def ragged_lens(B: int, S: int) -> torch.Tensor:
    """Per-row lengths with an empty row, a full row and random ones in between."""
    lens = torch.randint(1, S + 1, (B,), dtype=torch.int32)
    lens[0] = 0
    if B > 1:
        lens[-1] = S
    return lens.to(DEV)


# ------------------------------------------------------------------------------------------------
# prepare_memory / prepare_memory_
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
@pytest.mark.parametrize("S,P,D", [(100, 16, 64), (7, 16, 40), (64, 8, 36), (33, 1, 128)])
@pytest.mark.parametrize("ragged", [False, True])
def test_prepare_memory(dtype, mode, S, P, D, ragged):
    B, H = 3, 2
    keys = strided_view(torch.randn(B, H, S, D, device=DEV).to(dtype))
    lens = ragged_lens(B, S) if ragged else None
    got = ops.prepare_memory(keys, P, mode=mode, seq_lens=lens)
    want = reference.prepare_memory(keys.cpu(), P, mode=mode,
                                    seq_lens=None if lens is None else lens.cpu())
    if mode == "minmax":
        assert torch.equal(got.cpu(), want)
    else:
        # float32 sums in token order, then one rounding to the dtype.
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=OUT_TOL[dtype],
                                   atol=OUT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
def test_prepare_memory_inplace_touches_only_its_pages(dtype, mode):
    B, H, S, D, P, first = 2, 3, 90, 64, 16, 3
    keys = strided_view(torch.randn(B, H, S, D, device=DEV).to(dtype))
    reps = 2 if mode == "minmax" else 1
    summary = torch.randn(B, H, 9, reps, D, device=DEV).to(dtype)  # 9 > ceil(90/16) = 6 pages
    before = summary.clone()
    ops.prepare_memory_(summary, keys, P, first, mode=mode)
    full = ops.prepare_memory(keys, P, mode=mode)
    assert torch.equal(summary[:, :, first:6], full[:, :, first:6])
    assert torch.equal(summary[:, :, :first], before[:, :, :first])
    assert torch.equal(summary[:, :, 6:], before[:, :, 6:])


# ------------------------------------------------------------------------------------------------
# topk_relevancy
# ------------------------------------------------------------------------------------------------


def make_relevancy_inputs(mode, B, Hq, Hkv, N, D, dtype, integer):
    gen = (lambda *s: integer_tensor(*s, dtype=dtype)) if integer else (
        lambda *s: torch.randn(*s, device=DEV).to(dtype))
    query = gen(B, Hq, D)
    weights = None
    if mode == "indexer":
        summary = gen(B, 1, N, 1, D)
        weights = gen(B, Hq).float()
    elif mode == "bound":
        a, b = gen(B, Hkv, N, D), gen(B, Hkv, N, D)
        summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    else:
        summary = gen(B, Hkv, N, 2, D)
    return query, summary, weights


def assert_valid_selection(scores_ref, got_scores, got_idx, k, nvalid, sink, recent):
    """Tie-tolerant check: the chosen set is a correct top-k when scores equal within tolerance.

    ``scores_ref`` [B, H, N] float64. Per row: indices ascending, unique, in range, padded with
    -1 at the end; forced pages present; reported scores match the reference; and no unchosen
    candidate beats a chosen one by more than the tolerance.
    """
    scores_ref = scores_ref.double()
    B, H, _ = scores_ref.shape
    for b in range(B):
        nv = nvalid[b]
        forced = set(range(min(sink, nv))) | set(range(max(nv - recent, 0), nv))
        expected_count = min(k, nv)
        for h in range(H):
            idx = got_idx[b, h].tolist()
            chosen = [p for p in idx if p >= 0]
            assert chosen == sorted(set(chosen)) and len(chosen) == expected_count
            assert all(p == -1 for p in idx[expected_count:])
            assert all(math.isinf(s) and s < 0 for s in got_scores[b, h, expected_count:].tolist())
            assert forced <= set(chosen)
            row = scores_ref[b, h, :nv]
            tol = SCORE_RTOL * (row.abs().max().item() + 1.0)
            sel = torch.tensor(chosen, dtype=torch.long)
            torch.testing.assert_close(got_scores[b, h, :expected_count].double(), row[sel],
                                       rtol=0, atol=tol)
            free = [p for p in chosen if p not in forced]
            rest = sorted(set(range(nv)) - set(chosen))
            if free and rest:
                assert row[free].min() >= row[rest].max() - tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["bound", "dot", "indexer"])
@pytest.mark.parametrize("hq_hkv", [(4, 4), (6, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_topk_relevancy_exact_on_integer_data(dtype, mode, hq_hkv, group_reduce):
    Hq, Hkv = hq_hkv
    if mode == "indexer":
        Hkv = 1
    B, N, D, k = 3, 77, 64, 20
    query, summary, weights = make_relevancy_inputs(mode, B, Hq, Hkv, N, D, dtype, True)
    num_pages = torch.tensor([N, 0, 13], dtype=torch.int32, device=DEV)
    args = dict(mode=mode, num_pages=num_pages, sink_pages=2, recent_pages=3,
                group_reduce=group_reduce, weights=weights)
    got_s, got_i = ops.topk_relevancy(query, summary, k, **args)
    want_s, want_i = reference.topk_relevancy(
        query.cpu(), summary.cpu(), k, **{**args, "num_pages": num_pages.cpu(),
                                          "weights": None if weights is None else weights.cpu()})
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["bound", "dot", "indexer"])
@pytest.mark.parametrize("N,k,sink,recent", [(300, 37, 1, 4), (10, 16, 0, 0), (2000, 512, 4, 8),
                                             (5000, 1, 0, 0)])
def test_topk_relevancy_random(dtype, mode, N, k, sink, recent):
    B, Hq, Hkv, D = 2, 12, 4, 128
    if mode == "indexer":
        Hkv = 1
    query, summary, weights = make_relevancy_inputs(mode, B, Hq, Hkv, N, D, dtype, False)
    nvalid = [N, max(N // 3, 1)]
    num_pages = torch.tensor(nvalid, dtype=torch.int32, device=DEV)
    got_s, got_i = ops.topk_relevancy(query, summary, k, mode=mode, num_pages=num_pages,
                                      sink_pages=sink, recent_pages=recent, weights=weights)
    ref = reference.relevancy_scores(query.double(), summary.double(), mode=mode,
                                     weights=None if weights is None else weights.double())
    assert_valid_selection(ref.cpu(), got_s.cpu(), got_i.cpu(), k, nvalid, sink, recent)


def test_topk_relevancy_strided_inputs_and_nan():
    B, Hq, Hkv, N, D, k = 2, 8, 2, 200, 64, 30
    query = torch.randn(B, Hq, 2 * D, device=DEV)[:, :, :D]
    big = torch.randn(B, Hkv, N + 7, 2, D, device=DEV)
    big = torch.stack([big.amin(3), big.amax(3)], dim=3)
    summary = big[:, :, 3 : N + 3]
    summary[0, 0, 5] = float("nan")  # ranks as -inf; its score is reported as computed
    got_s, got_i = ops.topk_relevancy(query, summary, k)
    ref = reference.relevancy_scores(query.double(), summary.double())
    assert 5 not in got_i[0, 0].tolist()
    assert_valid_selection(ref.nan_to_num(nan=-math.inf).cpu(), got_s.cpu(), got_i.cpu(), k,
                           [N, N], 0, 0)


def test_topk_relevancy_million_pages_k4096():
    # Integer data: every score is exact, so the selection must equal the reference's.
    B, Hq, Hkv, N, D, k = 1, 4, 2, 1 << 20, 16, 4096
    query, summary, _ = make_relevancy_inputs("bound", B, Hq, Hkv, N, D, torch.bfloat16, True)
    got_s, got_i = ops.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=64)
    scores = reference.relevancy_scores(query, summary)
    want_s, want_i = reference.select_topk(scores.cpu(), k, sink_pages=1, recent_pages=64)
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


# The 16-bit summaries with D of 64 or 128 and groups of up to 8 heads are scored on the tensor
# cores, and rows of up to 3072 pages are selected inside the scoring kernel (longer ones by the
# selection kernel); these cases cover both sides of each of those limits and many blocks per row.
@pytest.mark.parametrize("N", [1500, 3073])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,reps", [("bound", 2), ("dot", 1), ("dot", 2)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("hq_hkv", [(8, 8), (32, 8), (28, 4), (64, 8), (40, 4)])
def test_topk_relevancy_tensor_core_paths(dtype, mode, reps, D, hq_hkv, N):
    check_integer_topk(dtype, mode, reps, D, hq_hkv, N=N, k=129)


@pytest.mark.parametrize("mode,reps", [("bound", 2), ("dot", 2)])
def test_topk_relevancy_tensor_core_long_rows_select_separately(mode, reps):
    check_integer_topk(torch.bfloat16, mode, reps, 128, (32, 8), N=9000, k=300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,N,k", [(64, 20000, 2048), (40, 3000, 300), (9, 700, 64)])
def test_topk_relevancy_indexer_tensor_cores_exact_on_integer_data(dtype, heads, N, k):
    # DeepSeek-style indexer: up to 64 index heads on the tensor cores; 20000 tokens also take
    # the 1024-thread selection kernel.
    B, D = 2, 128
    query = integer_tensor(B, heads, D, dtype=dtype, low=-2, high=3)
    keys = integer_tensor(B, 1, N, 1, D, dtype=dtype, low=-2, high=3)
    weights = integer_tensor(B, heads, dtype=torch.float32, low=0, high=4)
    num_pages = torch.tensor([N, N // 3], dtype=torch.int32, device=DEV)
    args = dict(mode="indexer", weights=weights, num_pages=num_pages)
    got_s, got_i = ops.topk_relevancy(query, keys, k, **args)
    want_s, want_i = reference.topk_relevancy(
        query.cpu(), keys.cpu(), k, **{**args, "weights": weights.cpu(),
                                        "num_pages": num_pages.cpu()})
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


def test_topk_relevancy_indexer_tensor_cores_non_finite_keys():
    B, heads, N, D, k = 1, 16, 96, 64, 20
    query = integer_tensor(B, heads, D, dtype=torch.bfloat16)
    keys = integer_tensor(B, 1, N, 1, D, dtype=torch.bfloat16)
    keys[0, 0, 4, 0, 3] = float("inf")
    keys[0, 0, 50, 0, 0] = -float("inf")
    weights = integer_tensor(B, heads, dtype=torch.float32, low=0, high=4)
    got_s, got_i = ops.topk_relevancy(query, keys, k, mode="indexer", weights=weights)
    # The CPU backend shares the scalar formula that the GPU uses for non-finite tokens; integer
    # data makes every finite score exact.
    want_s, want_i = ops.topk_relevancy(query.cpu(), keys.cpu(), k, mode="indexer",
                                        weights=weights.cpu())
    assert torch.equal(got_i.cpu(), want_i)
    torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("switch", ["MEMOPS_CUDA_FUSED_SELECT", "MEMOPS_CUDA_TENSOR_CORES"])
def test_topk_relevancy_switches_give_the_same_selection(switch, monkeypatch):
    # Integer data: the fused and separate selections, and the tensor-core and portable kernels,
    # must agree exactly; the switches are read at every call.
    B, Hq, Hkv, N, D, k = 3, 32, 8, 2500, 128, 100
    query = integer_tensor(B, Hq, D, dtype=torch.bfloat16)
    a, b = (integer_tensor(B, Hkv, N, D, dtype=torch.bfloat16) for _ in range(2))
    summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    num_pages = torch.tensor([N, 7, 1000], dtype=torch.int32, device=DEV)
    args = dict(num_pages=num_pages, sink_pages=2, recent_pages=3)
    default = ops.topk_relevancy(query, summary, k, **args)
    monkeypatch.setenv(switch, "0")
    switched = ops.topk_relevancy(query, summary, k, **args)
    assert torch.equal(default[1], switched[1]) and torch.equal(default[0], switched[0])


def test_sparse_apply_portable_and_tensor_core_kernels_agree(monkeypatch):
    B, Hq, Hkv, S, D, P = 2, 32, 8, 3000, 128, 16
    query = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    idx = sorted_page_indices(B, Hkv, 40, -(-S // P))
    out, lse = ops.sparse_apply(query, k_cache, v_cache, idx, P)
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", "0")
    out_portable, lse_portable = ops.sparse_apply(query, k_cache, v_cache, idx, P)
    # Both within one bf16 rounding of the output (the tensor-core kernel also rounds P to bf16).
    torch.testing.assert_close(out.float(), out_portable.float(), rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(lse, lse_portable, rtol=1e-5, atol=1e-5)


def check_integer_topk(dtype, mode, reps, D, hq_hkv, N, k):
    Hq, Hkv = hq_hkv
    B = 2
    query = integer_tensor(B, Hq, D, dtype=dtype)
    if mode == "bound":
        a, b = integer_tensor(B, Hkv, N, D, dtype=dtype), integer_tensor(B, Hkv, N, D, dtype=dtype)
        summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    else:
        summary = integer_tensor(B, Hkv, N, reps, D, dtype=dtype)
    num_pages = torch.tensor([N, N // 2 + 5], dtype=torch.int32, device=DEV)
    args = dict(mode=mode, num_pages=num_pages, sink_pages=1, recent_pages=4)
    got_s, got_i = ops.topk_relevancy(query, summary, k, **args)
    want_s, want_i = reference.topk_relevancy(query.cpu(), summary.cpu(), k,
                                              **{**args, "num_pages": num_pages.cpu()})
    # Integer data: every product and partial sum is exact, so the selection is the reference's.
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


# The 256-thread row selection runs loops of 8, 12, 16 or 32 keys a thread, chosen per row from
# its valid pages; rows on both sides of each width (2048 | 2049, 3072 | 3073 pages), fused into
# the scoring kernel (up to kFusedSelectDefaultMaxPages) or as the selection kernel.
@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "separate"])
@pytest.mark.parametrize("N", [2049, 3073, 4096])
def test_topk_relevancy_selection_widths(N, fused, monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_SELECT", fused)
    B, Hq, Hkv, D, k = 4, 32, 8, 128, 129
    query = integer_tensor(B, Hq, D, dtype=torch.bfloat16)
    a, b = (integer_tensor(B, Hkv, N, D, dtype=torch.bfloat16) for _ in range(2))
    summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    num_pages = torch.tensor([N, 2048, min(N, 3072), 2049], dtype=torch.int32, device=DEV)
    args = dict(num_pages=num_pages, sink_pages=1, recent_pages=2)
    got_s, got_i = ops.topk_relevancy(query, summary, k, **args)
    want_s, want_i = reference.topk_relevancy(query.cpu(), summary.cpu(), k,
                                              **{**args, "num_pages": num_pages.cpu()})
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_topk_relevancy_tensor_core_non_finite_pages_match_the_reference(dtype, group_reduce):
    # inf and NaN in the summary or the query (0 * inf) are scored by the exact scalar formula.
    B, Hq, Hkv, N, D, k = 1, 8, 2, 64, 128, 20
    query = integer_tensor(B, Hq, D, dtype=dtype)
    query[0, 0, :4] = 0
    query[0, 3, 7] = float("inf")
    a, b = integer_tensor(B, Hkv, N, D, dtype=dtype), integer_tensor(B, Hkv, N, D, dtype=dtype)
    summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    summary[0, 0, 3, 0, 0] = -float("inf")  # meets q = 0: NaN in the reference
    summary[0, 0, 5, 1, 9] = float("inf")
    summary[0, 1, 7, :, 20] = float("nan")
    summary[0, 1, 9, 0, :] = float("inf")  # min above max: an empty page's summary
    summary[0, 1, 9, 1, :] = -float("inf")
    got_s, got_i = ops.topk_relevancy(query, summary, k, group_reduce=group_reduce)
    want_s, want_i = reference.topk_relevancy(query.cpu(), summary.cpu(), k,
                                              group_reduce=group_reduce)
    assert torch.equal(got_i.cpu(), want_i)
    torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)


def test_topk_relevancy_out_of_range_num_pages_is_clamped():
    # CUDA does not read num_pages back (no host sync): values outside [0, N] are clamped.
    B, Hq, Hkv, N, D, k = 2, 4, 2, 50, 32, 8
    query, summary, _ = make_relevancy_inputs("bound", B, Hq, Hkv, N, D, torch.float32, True)
    bad = torch.tensor([N + 100, -5], dtype=torch.int32, device=DEV)
    good = torch.tensor([N, 0], dtype=torch.int32, device=DEV)
    got = ops.topk_relevancy(query, summary, k, num_pages=bad)
    want = ops.topk_relevancy(query, summary, k, num_pages=good)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


# ------------------------------------------------------------------------------------------------
# gather_retrieve
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.int8, torch.float64])
@pytest.mark.parametrize("S,P,D", [(100, 16, 64), (5, 16, 8), (70, 7, 3)])
def test_gather_retrieve_bit_exact(dtype, S, P, D):
    B, H, k = 3, 2, 6
    memory = strided_view((torch.randn(B, H, S, D, device=DEV) * 50).to(dtype))
    N = -(-S // P)
    idx = torch.randint(-1, N, (B, H, k), dtype=torch.int32)
    idx = torch.sort(torch.where(idx < 0, N + 1, idx), dim=-1).values
    idx = torch.where(idx > N, -1, idx).to(torch.int32).to(DEV)
    lens = ragged_lens(B, S)
    got, got_len = ops.gather_retrieve(memory, idx, P, seq_lens=lens)
    want, want_len = reference.gather_retrieve(memory.cpu(), idx.cpu(), P, seq_lens=lens.cpu())
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got_len.cpu(), want_len)


def test_gather_retrieve_out_of_range_index_is_padding():
    B, H, S, D, P = 1, 2, 64, 16, 16
    memory = torch.randn(B, H, S, D, device=DEV)
    idx = torch.tensor([[[0, 99], [1, -7]]], dtype=torch.int32, device=DEV)
    pad = torch.tensor([[[0, -1], [1, -1]]], dtype=torch.int32, device=DEV)
    got = ops.gather_retrieve(memory, idx, P)
    want = ops.gather_retrieve(memory, pad, P)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------------
# sparse_apply
# ------------------------------------------------------------------------------------------------


def sorted_page_indices(B, H, k, N, pad_from=None):
    """Ascending unique page indices [B, H, k], -1 padding at the end of some rows."""
    rows = []
    for _ in range(B * H):
        take = min(k, N)
        row = torch.randperm(N)[:take].sort().values
        if pad_from is not None:
            row[pad_from:] = -1
        rows.append(torch.cat([row, torch.full((k - take,), -1)]))
    return torch.stack(rows).view(B, H, k).to(torch.int32).to(DEV)


def check_attention(query, k_cache, v_cache, idx, P, lens, scale=None):
    out, lse = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens, scale=scale)
    want_out, want_lse = reference.sparse_apply(
        query.cpu(), k_cache.cpu(), v_cache.cpu(), None if idx is None else idx.cpu(), P,
        seq_lens=None if lens is None else lens.cpu(), scale=scale, compute_dtype=torch.float64)
    tol = OUT_TOL[query.dtype]
    torch.testing.assert_close(out.cpu().double(), want_out.double(), rtol=tol, atol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.all(out.cpu()[~finite] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq_hkv", [(4, 4), (6, 2), (8, 2), (16, 2), (7, 1), (32, 2)])
@pytest.mark.parametrize("index_heads", ["kv", "q", "dense"])
def test_sparse_apply(dtype, hq_hkv, index_heads):
    Hq, Hkv = hq_hkv
    B, S, D, P, k = 3, 300, 128, 16, 7
    N = -(-S // P)
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    k_cache = strided_view(torch.randn(B, Hkv, S, D, device=DEV).to(dtype))
    v_cache = strided_view(torch.randn(B, Hkv, S, D, device=DEV).to(dtype))
    idx = None
    if index_heads != "dense":
        idx = sorted_page_indices(B, Hkv if index_heads == "kv" else Hq, k, N, pad_from=5)
    check_attention(query, k_cache, v_cache, idx, P, ragged_lens(B, S))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,P,D", [(5, 16, 64), (77, 5, 36), (1000, 16, 256), (40, 16, 8)])
def test_sparse_apply_shapes(dtype, S, P, D):
    B, Hq, Hkv = 2, 8, 4
    N = -(-S // P)
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    idx = sorted_page_indices(B, Hkv, N + 2, N)
    check_attention(query, k_cache, v_cache, idx, P, None, scale=0.3)
    check_attention(query, k_cache, v_cache, None, P, None)


def test_sparse_apply_dense_long_context_splits():
    B, Hq, Hkv, S, D = 1, 32, 8, 20000, 128
    query = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    out, lse = ops.sparse_apply(query, k_cache, v_cache, None, 16)
    logits = torch.einsum("bhd,bhsd->bhs", query.double(),
                          k_cache.double().repeat_interleave(Hq // Hkv, 1)) * D**-0.5
    want = torch.einsum("bhs,bhsd->bhd", logits.softmax(-1),
                        v_cache.double().repeat_interleave(Hq // Hkv, 1))
    torch.testing.assert_close(out.double(), want, rtol=OUT_TOL[torch.bfloat16],
                               atol=OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_sparse_apply_out_of_range_indices_are_padding():
    B, Hq, Hkv, S, D, P = 1, 4, 2, 64, 32, 16
    query = torch.randn(B, Hq, D, device=DEV)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV)
    idx = torch.tensor([[[0, 2, 40], [1, -9, 3]]], dtype=torch.int32, device=DEV)
    pad = torch.tensor([[[0, 2, -1], [1, -1, 3]]], dtype=torch.int32, device=DEV)
    got = ops.sparse_apply(query, k_cache, v_cache, idx, P)
    want = ops.sparse_apply(query, k_cache, v_cache, pad, P)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_sparse_apply_seq_lens_out_of_range_is_clamped():
    B, Hq, Hkv, S, D, P = 2, 4, 2, 64, 32, 16
    query = torch.randn(B, Hq, D, device=DEV)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV)
    bad = torch.tensor([S + 1000, -3], dtype=torch.int32, device=DEV)
    good = torch.tensor([S, 0], dtype=torch.int32, device=DEV)
    got = ops.sparse_apply(query, k_cache, v_cache, None, P, seq_lens=bad)
    want = ops.sparse_apply(query, k_cache, v_cache, None, P, seq_lens=good)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# The split merge: by a kernel of its own (default) or by the last split block of each row
# (MEMOPS_CUDA_FUSED_MERGE=1). Splits are planned from shapes: k = 4 pages of 16 tokens is one
# split in both kernels (<= 128 tokens portable, <= 64 tensor cores); k = 300 at batch 1 is tens
# of splits (each about 128 or 64 tokens), at batch 8 a few.
SPLIT_KERNELS = [(torch.bfloat16, "1"), (torch.bfloat16, "0"), (torch.float32, "1")]
SPLIT_KERNEL_IDS = ["tensor-cores", "portable-bf16", "portable-fp32"]


def kernel_names(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def split_merge_inputs(B, Hq, Hkv, dtype, k, S=6000, D=128, P=16):
    N = -(-S // P)
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    k_cache = strided_view(torch.randn(B, Hkv, S, D, device=DEV).to(dtype))
    v_cache = strided_view(torch.randn(B, Hkv, S, D, device=DEV).to(dtype))
    # Ascending pages, the last fifth of each row padding: the last splits of a row attend nothing.
    idx = sorted_page_indices(B, Hkv, k, N, pad_from=k - k // 5 if k >= 5 else None)
    return query, k_cache, v_cache, idx, P


@pytest.mark.parametrize("dtype,tensor_cores", SPLIT_KERNELS, ids=SPLIT_KERNEL_IDS)
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("hq_hkv", [(32, 8), (8, 8)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("k", [4, 300], ids=["one-split", "many-splits"])
def test_sparse_apply_split_merge(dtype, tensor_cores, B, hq_hkv, k, monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", tensor_cores)
    Hq, Hkv = hq_hkv
    query, k_cache, v_cache, idx, P = split_merge_inputs(B, Hq, Hkv, dtype, k)
    S = k_cache.shape[2]
    # Rows of no token (every split empty), of every token, and short ones whose later splits
    # hold only pages past seq_lens (their max is -inf).
    lens_cases = [torch.tensor([0], dtype=torch.int32, device=DEV).repeat(B)]
    if B == 1:
        lens_cases.append(torch.tensor([700], dtype=torch.int32, device=DEV))
    else:
        lens_cases.append(torch.tensor([0, S, 700, 40, 1, 3000, S - 1, 16], dtype=torch.int32,
                                       device=DEV))
    for lens in lens_cases:
        check_attention(query, k_cache, v_cache, idx, P, lens)
        separate = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens)
        monkeypatch.setenv("MEMOPS_CUDA_FUSED_MERGE", "1")
        fused = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens)
        monkeypatch.delenv("MEMOPS_CUDA_FUSED_MERGE")
        # The same merge code in both: the same bits.
        assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
    check_attention(query, k_cache, v_cache, idx, P, None)


@pytest.mark.parametrize("dtype,tensor_cores", SPLIT_KERNELS, ids=SPLIT_KERNEL_IDS)
@pytest.mark.parametrize("k", [4, 300], ids=["one-split", "many-splits"])
def test_sparse_apply_merge_switch_launches(dtype, tensor_cores, k, monkeypatch):
    """The default launches the split kernel (its name shows which ran) and the merge kernel; the
    opt-in fused merge only the split kernel. Guards the bit-equality test above against a switch
    that does nothing."""
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", tensor_cores)
    query, k_cache, v_cache, idx, P = split_merge_inputs(1, 32, 8, dtype, k)
    call = lambda: ops.sparse_apply(query, k_cache, v_cache, idx, P)  # noqa: E731
    separate = kernel_names(call)
    split_kernel = "sparse_apply_tc_kernel" if tensor_cores == "1" and dtype != torch.float32 \
        else "sparse_apply_split_kernel"
    assert any(split_kernel in n for n in separate), separate
    assert any("sparse_apply_merge_kernel" in n for n in separate), separate
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_MERGE", "1")
    fused = kernel_names(call)
    assert any(split_kernel in n for n in fused), fused
    assert not any("sparse_apply_merge_kernel" in n for n in fused), fused


@pytest.mark.parametrize("dtype,tensor_cores", SPLIT_KERNELS, ids=SPLIT_KERNEL_IDS)
@pytest.mark.parametrize("k", [4, 300], ids=["one-split", "many-splits"])
@pytest.mark.parametrize("fused_merge", ["1", "0"])
def test_sparse_apply_merge_paths_report_value_errors(dtype, tensor_cores, k, fused_merge,
                                                      monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", tensor_cores)
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_MERGE", fused_merge)
    B = 2
    query, k_cache, v_cache, idx, P = split_merge_inputs(B, 32, 8, dtype, k)
    S, N = k_cache.shape[2], -(-k_cache.shape[2] // P)
    lens = torch.tensor([S, 900], dtype=torch.int32, device=DEV)
    torch_memops.value_errors(DEV)
    want = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens)
    assert torch_memops.value_errors(DEV) == set()
    bad = idx.clone()
    # Out of range in the last slot (the last split of a row) and the first: padding.
    pad = idx.clone()
    bad[0, 3, k - 1], bad[1, 7, 0] = N + 5, -7
    pad[0, 3, k - 1], pad[1, 7, 0] = -1, -1
    want = ops.sparse_apply(query, k_cache, v_cache, pad, P, seq_lens=lens)
    got = ops.sparse_apply(query, k_cache, v_cache, bad, P,
                           seq_lens=torch.tensor([10**6, 900], dtype=torch.int32, device=DEV))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch_memops.value_errors(DEV) == {"indices", "seq_lens"}


@pytest.mark.parametrize("dtype,tensor_cores", SPLIT_KERNELS, ids=SPLIT_KERNEL_IDS)
def test_sparse_apply_fused_merge_replays_in_a_cuda_graph(dtype, tensor_cores, monkeypatch):
    """Many splits: the per-row counters are zeroed inside the graph, so every replay merges."""
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", tensor_cores)
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_MERGE", "1")
    B, Hq, Hkv, k = 1, 32, 8, 300
    static = list(split_merge_inputs(B, Hq, Hkv, dtype, k)[:4])
    P = 16
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sparse_apply(*static, P)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.sparse_apply(*static, P)
    for _ in range(3):
        fresh = split_merge_inputs(B, Hq, Hkv, dtype, k)[:4]
        for buf, value in zip(static, fresh):
            buf.copy_(value)
        graph.replay()
        want_out, want_lse = ops.sparse_apply(*static, P)  # eager, the same buffers
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


# ------------------------------------------------------------------------------------------------
# merge_attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention(dtype):
    rows, D = (3, 5), 72
    out_a = torch.randn(*rows, D, device=DEV).to(dtype)
    out_b = torch.randn(*rows, D, device=DEV).to(dtype)
    lse_a = torch.randn(*rows, device=DEV) * 4
    lse_b = torch.randn(*rows, device=DEV) * 4
    lse_a[0, 0] = -math.inf
    lse_a[1, 1] = lse_b[1, 1] = -math.inf
    out, lse = ops.merge_attention(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = reference.merge_attention(out_a.cpu(), lse_a.cpu(), out_b.cpu(),
                                                   lse_b.cpu())
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.cpu().float(), want_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Out-of-range values: the rule without a host sync, and the checked mode (docs/design.md)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _value_checks_off():
    """Every test starts with the checked mode off (MEMOPS_VALUE_CHECKS may be set) and leaves
    the setting as it found it."""
    previous = torch_memops.value_checks()
    torch_memops.set_value_checks(False)
    yield
    torch_memops.set_value_checks(previous)


def _bad_value_calls():
    """(id, call(device), call with the rule applied by hand) for the values of issue 10: pages
    9 and 10^6 of 3 in gather_retrieve, 10^7 and -5 in sparse_apply, seq_lens of 10^6 for a
    20-token cache, num_pages beyond N. Inputs are built once on the CPU; each call moves them."""
    S, P, D = 20, 8, 64
    N = -(-S // P)
    keys = torch.randn(2, 2, S, D)
    values = torch.randn(2, 2, S, D)
    query = torch.randn(2, 4, D)
    summary = reference.prepare_memory(keys, P)
    t = lambda *rows: torch.tensor(rows, dtype=torch.int32)  # noqa: E731
    idx_gather = t([[0, 9, 10**6], [2, -5, 1]], [[1, -1, -1], [10**6, 0, 2]])
    pad_gather = t([[0, -1, -1], [2, -1, 1]], [[1, -1, -1], [-1, 0, 2]])
    idx_apply = t([[0, 10**7, 2], [-5, 1, 2]], [[1, 2, -5], [0, -1, 10**7]])
    pad_apply = t([[0, -1, 2], [-1, 1, 2]], [[1, 2, -1], [0, -1, -1]])
    long_lens, clamped_lens = t(10**6, 3), t(S, 3)
    neg_lens, zero_lens = t(S, -4), t(S, 0)

    def on(device, *ts):
        return [None if x is None else x.to(device) for x in ts]

    def gather(idx, lens=None):
        return lambda d: ops.gather_retrieve(*on(d, keys, idx), P,
                                             seq_lens=None if lens is None else lens.to(d))

    def apply(idx, lens=None):
        return lambda d: ops.sparse_apply(*on(d, query, keys, values, idx), P,
                                          seq_lens=None if lens is None else lens.to(d))

    def prepare(lens):
        return lambda d: ops.prepare_memory(keys.to(d), P, seq_lens=lens.to(d))

    def topk(pages):
        return lambda d: ops.topk_relevancy(*on(d, query, summary), 2, num_pages=pages.to(d))

    return [
        ("gather/index-9-and-1e6", gather(idx_gather), gather(pad_gather)),
        ("gather/seq_lens-1e6", gather(pad_gather, long_lens), gather(pad_gather, clamped_lens)),
        ("apply/index-1e7-and-neg5", apply(idx_apply), apply(pad_apply)),
        ("apply/seq_lens-1e6", apply(pad_apply, long_lens), apply(pad_apply, clamped_lens)),
        ("apply/seq_lens-neg-dense", apply(None, neg_lens), apply(None, zero_lens)),
        ("prepare/seq_lens-1e6", prepare(long_lens), prepare(clamped_lens)),
        ("prepare/seq_lens-neg", prepare(neg_lens), prepare(zero_lens)),
        ("topk/num_pages-over-N", topk(t(N + 5, 1)), topk(t(N, 1))),
        ("topk/num_pages-neg", topk(t(N, -2)), topk(t(N, 0))),
    ]


BAD_VALUE_IDS = [c[0] for c in _bad_value_calls()]


@pytest.mark.parametrize("case", range(len(BAD_VALUE_IDS)), ids=BAD_VALUE_IDS)
def test_out_of_range_values_follow_the_rule(case):
    """Checked mode off: the CUDA result equals the result of the inputs with the rule applied
    (bad pages made -1, seq_lens and num_pages clamped), which the CPU accepts."""
    name, bad, fixed = _bad_value_calls()[case]
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    got, want = as_tuple(bad(DEV)), as_tuple(fixed(DEV))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    if name.startswith(("gather/", "prepare/")):  # data movement and min/max: the CPU's bits
        for g, c in zip(got, as_tuple(fixed("cpu")), strict=True):
            assert torch.equal(g.cpu(), c)


# The argument whose bit of the value-error word each bad case sets.
BAD_VALUE_ARGUMENT = {"index": "indices", "seq_lens": "seq_lens", "num_pages": "num_pages"}


@pytest.mark.parametrize("case", range(len(BAD_VALUE_IDS)), ids=BAD_VALUE_IDS)
def test_value_error_word_records_the_rule(case):
    name, bad, fixed = _bad_value_calls()[case]
    torch_memops.value_errors(DEV)  # allocates and clears the word
    fixed(DEV)
    assert torch_memops.value_errors(DEV) == set()
    bad(DEV)
    want = {arg for key, arg in BAD_VALUE_ARGUMENT.items() if name.split("/")[1].startswith(key)}
    assert torch_memops.value_errors(DEV, clear=False) == want
    assert torch_memops.value_error_word(DEV).item() != 0
    assert torch_memops.value_errors(DEV) == want
    assert torch_memops.value_errors(DEV) == set()  # cleared


@pytest.mark.parametrize("case", range(len(BAD_VALUE_IDS)), ids=BAD_VALUE_IDS)
def test_checked_mode_raises_the_cpu_error(case):
    _, bad, _ = _bad_value_calls()[case]
    with pytest.raises(ValueError) as on_cpu:
        bad("cpu")
    torch_memops.set_value_checks(True)
    with pytest.raises(ValueError) as on_cuda:
        bad(DEV)
    assert str(on_cuda.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


def test_checked_mode_writes_nothing_into_the_summary():
    keys = torch.randn(1, 2, 20, 64, device=DEV)
    summary = torch.full((1, 2, 3, 2, 64), 7.0, device=DEV)
    torch_memops.set_value_checks(True)
    with pytest.raises(ValueError, match=r"`seq_lens\[0\]` = 1000000 is outside \[0, S\]"):
        ops.prepare_memory_(summary, keys, 8, 0,
                            seq_lens=torch.tensor([10**6], dtype=torch.int32, device=DEV))
    assert torch.all(summary == 7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
def test_rule_on_every_kernel_path(dtype, tensor_cores, monkeypatch):
    """bfloat16, D = 128 takes the tensor-core kernels of sparse_apply and topk_relevancy unless
    switched off; float32 always the portable ones."""
    monkeypatch.setenv("MEMOPS_CUDA_TENSOR_CORES", tensor_cores)
    B, Hq, Hkv, S, D, P = 2, 8, 2, 300, 128, 16
    N = -(-S // P)
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV).to(dtype)
    idx = sorted_page_indices(B, Hkv, 9, N, pad_from=6)
    bad = idx.clone()
    bad[0, 0, 6], bad[0, 1, 7], bad[1, 0, 8], bad[1, 1, 6] = 10**7, -5, N, -(2**31)
    lens = torch.tensor([S, 100], dtype=torch.int32, device=DEV)
    torch_memops.value_errors(DEV)
    want = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens)
    assert torch_memops.value_errors(DEV) == set()
    got = ops.sparse_apply(query, k_cache, v_cache, bad, P,
                           seq_lens=torch.tensor([10**6, 100], dtype=torch.int32, device=DEV))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch_memops.value_errors(DEV) == {"indices", "seq_lens"}

    a, b = (torch.randn(B, Hkv, N, D, device=DEV).to(dtype) for _ in range(2))
    summary = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=3)
    pages = torch.tensor([N + 1000, -7], dtype=torch.int32, device=DEV)
    clamped = torch.tensor([N, 0], dtype=torch.int32, device=DEV)
    want = ops.topk_relevancy(query, summary, 5, num_pages=clamped, sink_pages=1, recent_pages=1)
    assert torch_memops.value_errors(DEV) == set()
    got = ops.topk_relevancy(query, summary, 5, num_pages=pages, sink_pages=1, recent_pages=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch_memops.value_errors(DEV) == {"num_pages"}


def test_checked_mode_is_off_inside_cuda_graph_capture():
    B, Hq, Hkv, S, D, P = 1, 8, 2, 64, 64, 16
    query = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16)
    k_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    good = torch.tensor([[[0, 1, 3], [2, 3, -1]]], dtype=torch.int32, device=DEV)
    static_idx = good.clone()
    torch_memops.set_value_checks(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sparse_apply(query, k_cache, v_cache, static_idx, P)  # warm-up, checked: valid
    torch.cuda.current_stream().wait_stream(side)
    assert torch_memops.value_errors(DEV) == set()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.sparse_apply(query, k_cache, v_cache, static_idx, P)
    static_idx.copy_(torch.tensor([[[0, 99, 3], [2, 3, -8]]], dtype=torch.int32))
    graph.replay()
    assert torch_memops.value_errors(DEV) == {"indices"}  # recorded inside the graph
    want_out, want_lse = ops.sparse_apply(
        query, k_cache, v_cache, torch.tensor([[[0, -1, 3], [2, 3, -1]]], dtype=torch.int32,
                                              device=DEV), P)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match="`indices` holds page 99"):
        ops.sparse_apply(query, k_cache, v_cache, static_idx, P)  # eager again: checked


# ------------------------------------------------------------------------------------------------
# Errors, opcheck, compile, CUDA graphs, 64-bit indexing
# ------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    q = torch.randn(1, 4, 512, device=DEV)
    cache = torch.randn(1, 2, 32, 512, device=DEV)
    with pytest.raises(RuntimeError, match="head dims D <= 256"):
        ops.sparse_apply(q, cache, cache, None, 16)
    with pytest.raises(RuntimeError, match="`k_cache` is on"):
        ops.sparse_apply(q[..., :64], cache[..., :64].cpu(), cache[..., :64], None, 16)
    with pytest.raises(ValueError, match="`k` must be > 0"):
        ops.topk_relevancy(q[..., :64], torch.randn(1, 2, 8, 2, 64, device=DEV), 0)


def _opcheck_cases():
    q = torch.randn(2, 8, 64, device=DEV)
    keys = torch.randn(2, 2, 50, 64, device=DEV)
    summary = reference.prepare_memory(keys.cpu(), 16).to(DEV)
    idx = torch.tensor([[[0, 2], [1, 3]], [[1, -1], [0, 3]]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([50, 20], dtype=torch.int32, device=DEV)
    lse = torch.randn(2, 8, device=DEV)
    return [
        (torch.ops.memops.prepare_memory.default, (keys, 16), {"seq_lens": lens}),
        (torch.ops.memops.prepare_memory_.default, (summary.clone(), keys, 16, 1), {}),
        (torch.ops.memops.topk_relevancy.default, (q, summary, 3), {"sink_pages": 1}),
        (torch.ops.memops.gather_retrieve.default, (keys, idx, 16), {"seq_lens": lens}),
        (torch.ops.memops.sparse_apply.default, (q, keys, keys, idx, 16), {"seq_lens": lens}),
        (torch.ops.memops.merge_attention.default, (q, lse, q.flip(0), lse.flip(0)), {}),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kwargs)


def decode_step(query, k_cache, v_cache, summary, lens, first_page, P, budget_pages, out_b,
                lse_b):
    ops.prepare_memory_(summary, k_cache, P, first_page, seq_lens=lens)
    _, idx = ops.topk_relevancy(query, summary, budget_pages, sink_pages=1, recent_pages=2)
    out, lse = ops.sparse_apply(query, k_cache, v_cache, idx, P, seq_lens=lens)
    return ops.merge_attention(out, lse, out_b, lse_b)


def _decode_inputs(B=2, Hq=8, Hkv=2, S=512, D=64, P=16, dtype=torch.bfloat16):
    N = S // P
    return dict(
        query=torch.randn(B, Hq, D, device=DEV, dtype=dtype),
        k_cache=torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype),
        v_cache=torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype),
        summary=torch.randn(B, Hkv, N, 2, D, device=DEV, dtype=dtype),
        lens=torch.randint(S // 2, S + 1, (B,), dtype=torch.int32, device=DEV),
        out_b=torch.randn(B, Hq, D, device=DEV, dtype=dtype),
        lse_b=torch.randn(B, Hq, device=DEV),
    )


def test_cuda_graph_decode_step_replays_with_new_data():
    static = _decode_inputs()
    eager_inputs = {k: v.clone() for k, v in static.items()}
    ops.prepare_memory_(eager_inputs["summary"], eager_inputs["k_cache"], 16, 0)
    ops.prepare_memory_(static["summary"], static["k_cache"], 16, 0)
    args = dict(first_page=0, P=16, budget_pages=8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(**static, **args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = decode_step(**static, **args)
    for _ in range(2):
        fresh = _decode_inputs()
        for name, value in fresh.items():
            static[name].copy_(value)
        graph.replay()
        want_out, want_lse = decode_step(**{k: v.clone() for k, v in fresh.items()}, **args)
        assert torch.equal(graph_out, want_out)
        assert torch.equal(graph_lse, want_lse)


def test_torch_compile_fullgraph_decode_step():
    """The whole decode step, the in-place prepare_memory_ included, compiles without breaks."""
    inputs = _decode_inputs()
    eager_inputs = {k: v.clone() for k, v in inputs.items()}
    eager = decode_step(**eager_inputs, first_page=0, P=16, budget_pages=8)
    compiled = torch.compile(decode_step, fullgraph=True)
    got = compiled(**inputs, first_page=0, P=16, budget_pages=8)
    assert torch.equal(inputs["summary"], eager_inputs["summary"])
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


def test_cache_over_2_pow_31_elements():
    # 4 x 8 x 524304 x 128 bf16 = 2^31 + 16384 elements (4 GiB) per cache: element offsets of
    # the last batch row exceed int32.
    B, Hkv, Hq, S, D, P = 4, 8, 32, (1 << 19) + 16, 128, 16
    free, _ = torch.cuda.mem_get_info()
    need = 2 * B * Hkv * S * D * 2 + (1 << 30)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB free")
    assert B * Hkv * S * D > 2**31
    k_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    query = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16)
    N = -(-S // P)
    pages = torch.tensor([0, N - 3, N - 2, N - 1], dtype=torch.int32)
    idx = pages.view(1, 1, -1).expand(B, Hkv, -1).contiguous().to(DEV)
    out, lse = ops.sparse_apply(query, k_cache, v_cache, idx, P)
    tokens = torch.cat([torch.arange(p * P, min((p + 1) * P, S)) for p in pages.tolist()]).to(DEV)
    b = B - 1
    k_sel, v_sel = k_cache[b:, :, tokens].cpu(), v_cache[b:, :, tokens].cpu()
    want_out, want_lse = reference.sparse_apply(query[b:].cpu(), k_sel, v_sel, None, P,
                                                compute_dtype=torch.float64)
    tol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(out[b:].cpu().double(), want_out.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse[b:].cpu(), want_lse, rtol=1e-5, atol=1e-5)

    got, lengths = ops.gather_retrieve(k_cache, idx, P)  # slots: pages 0, N-3, N-2, N-1
    assert torch.equal(got[b:, :, P:].cpu(), k_cache[b:, :, (N - 3) * P :].cpu())
    assert torch.all(lengths == 4 * P)

    summary = torch.empty(B, Hkv, N, 2, D, device=DEV, dtype=torch.bfloat16)
    ops.prepare_memory_(summary, k_cache, P, N - 2)
    last = k_cache[b:, :, (N - 2) * P :].cpu()
    assert torch.equal(summary[b:, :, N - 2, 0].cpu(), last[:, :, :P].amin(2))
    assert torch.equal(summary[b:, :, N - 1, 1].cpu(), last[:, :, P:].amax(2))


# ------------------------------------------------------------------------------------------------
# int8 summaries (prepare_memory mode="minmax_int8", topk_relevancy on codes + scales)
# ------------------------------------------------------------------------------------------------


def _int8_reference(keys, P, lens=None):
    return reference.prepare_memory_int8(keys.cpu(), P, seq_lens=None if lens is None else lens.cpu())


def _assert_int8_equal(got, want):
    assert torch.equal(got.codes.cpu(), want[0])
    s, w = got.scales.cpu(), want[1]
    assert bool(((s == w) | (torch.isnan(s) & torch.isnan(w))).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,P,D", [(100, 16, 64), (7, 16, 40), (64, 8, 36), (33, 1, 128),
                                   (300, 16, 256), (50, 4, 9)])
@pytest.mark.parametrize("ragged", [False, True])
def test_int8_prepare_memory_bit_exact(dtype, S, P, D, ragged):
    B, H = 3, 2
    span = 4 if dtype == torch.float16 else 30  # decades of magnitude the dtype holds
    scale = 10.0 ** torch.empty(B, H, S, 1, device=DEV).uniform_(-span, span)
    keys = strided_view((torch.randn(B, H, S, D, device=DEV) * scale).to(dtype))
    keys[0, 0, 0, 0] = float("nan")
    keys[1, 1, -1, 1] = float("inf")
    lens = ragged_lens(B, S) if ragged else None
    got = ops.prepare_memory(keys, P, mode="minmax_int8", seq_lens=lens)
    _assert_int8_equal(got, _int8_reference(keys, P, lens))


def test_int8_prepare_memory_inplace_touches_only_its_pages():
    B, H, S, D, P, first = 2, 3, 90, 128, 16, 3
    keys = strided_view(torch.randn(B, H, S, D, device=DEV).to(torch.bfloat16))
    codes = torch.randint(-128, 128, (B, H, 9, 2, D), dtype=torch.int8, device=DEV)
    scales = torch.randn(B, H, 9, device=DEV)
    before = codes.clone(), scales.clone()
    ops.prepare_memory_(ops.QuantizedSummary(codes, scales), keys, P, first, mode="minmax_int8")
    want = _int8_reference(keys, P)
    assert torch.equal(codes[:, :, first:6].cpu(), want[0][:, :, first:])
    assert torch.equal(scales[:, :, first:6].cpu(), want[1][:, :, first:])
    assert torch.equal(codes[:, :, :first], before[0][:, :, :first])
    assert torch.equal(codes[:, :, 6:], before[0][:, :, 6:])
    assert torch.equal(scales[:, :, 6:], before[1][:, :, 6:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq_hkv", [(4, 4), (8, 2), (28, 4), (32, 8)])
@pytest.mark.parametrize("D", [64, 128, 40])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_int8_topk_exact_on_integer_data(dtype, hq_hkv, D, group_reduce):
    # Keys in [-4, 4] with a +-4 per page quantise without rounding (scale 2^-4, codes 16 x), so
    # every score is an exact integer sum: the selection must equal the reference's.
    Hq, Hkv = hq_hkv
    B, P, N, k = 3, 4, 300, 37
    keys = integer_tensor(B, Hkv, N * P, D, dtype=dtype)
    keys[:, :, ::P, 0] = 4
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = integer_tensor(B, Hq, D, dtype=dtype)
    num_pages = torch.tensor([N, 0, 13], dtype=torch.int32, device=DEV)
    args = dict(num_pages=num_pages, sink_pages=2, recent_pages=3, group_reduce=group_reduce)
    got_s, got_i = ops.topk_relevancy(query, q8, k, **args)
    want_s, want_i = reference.topk_relevancy(query.cpu(), q8.codes.cpu(), k,
                                              summary_scales=q8.scales.cpu(),
                                              **{**args, "num_pages": num_pages.cpu()})
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)


def _int8_cpu_topk(query, q8, k, **kw):
    moved = {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    return ops.topk_relevancy(query.cpu(), ops.QuantizedSummary(q8.codes.cpu(), q8.scales.cpu()),
                              k, **moved)


@pytest.mark.parametrize("dtype", DTYPES)
# G = 1, 4, 7, 8 (tensor cores for 16-bit queries with D 64 / 128) and 18 (portable kernel).
@pytest.mark.parametrize("hq_hkv", [(2, 2), (8, 2), (14, 2), (16, 2), (36, 2)])
# 64, 128: tensor cores or 16 codes a lane in one run; 80: one run, lanes past D idle; 256: two.
@pytest.mark.parametrize("D", [64, 128, 80, 256])
@pytest.mark.parametrize("switch", ["", "MEMOPS_CUDA_FUSED_SELECT", "MEMOPS_CUDA_TENSOR_CORES"])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_int8_topk_every_kernel_matches_cpu_exactly(dtype, hq_hkv, D, switch, group_reduce,
                                                    monkeypatch):
    # Integer data (exact sums in any order), a NaN page, an infinite page and non-finite query
    # elements (those heads are scored again with the CPU's scalar formula): every page's score
    # and the selection equal the CPU backend's, bit for bit, on every kernel (tensor-core or
    # portable scoring, fused or separate selection). N = 333 is no multiple of any kernel's
    # pages per block, and num_pages leaves most of two rows unused.
    if switch:
        monkeypatch.setenv(switch, "0")
    Hq, Hkv = hq_hkv
    B, P, N, k = 3, 4, 333, 40
    keys = integer_tensor(B, Hkv, N * P, D, dtype=dtype)
    keys[:, :, ::P, 0] = 4
    keys[2, 1, 5 * P + 1, 3] = float("nan")  # page 5 of row (2, 1): NaN, ranks last
    keys[2, 0, 9 * P, 2] = -float("inf")  # page 9 of row (2, 0): +inf, ranks first
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = integer_tensor(B, Hq, D, dtype=dtype)
    query[1, 0, 5] = float("inf")  # a head of row (1, 0)
    query[1, Hq - 1, 3] = -float("inf")  # the last head of row (1, Hkv - 1)
    num_pages = torch.tensor([N, 17, 200], dtype=torch.int32, device=DEV)
    for kk, args in [(N, {}), (k, dict(num_pages=num_pages, sink_pages=2, recent_pages=3))]:
        args["group_reduce"] = group_reduce
        got_s, got_i = ops.topk_relevancy(query, q8, kk, **args)
        want_s, want_i = _int8_cpu_topk(query, q8, kk, **args)
        assert torch.equal(got_i.cpu(), want_i)
        torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
    assert 9 in got_i[2, 0].tolist() and 5 not in got_i[2, 1].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq", [40, 48, 64])
def test_int8_topk_large_groups_shared_memory(dtype, Hq):
    # One kv head of D = 256 for 40 to 64 query heads: the portable kernel's query takes 40 to
    # 64 KB of shared memory next to the fused selection's static part (the opt-in above 40 KB).
    B, P, N, D, k = 2, 8, 150, 256, 20
    keys = integer_tensor(B, 1, N * P, D, dtype=dtype)
    keys[:, :, ::P, 0] = 4
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = integer_tensor(B, Hq, D, dtype=dtype)
    for kk in (N, k):
        got_s, got_i = ops.topk_relevancy(query, q8, kk, sink_pages=1, recent_pages=2)
        want_s, want_i = _int8_cpu_topk(query, q8, kk, sink_pages=1, recent_pages=2)
        assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_s.cpu(), want_s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("switch", ["", "MEMOPS_CUDA_FUSED_SELECT"])
def test_int8_topk_without_pages(dtype, switch, monkeypatch):
    # N = 0: nothing is scored, yet every row is padded (the fused selection still runs).
    if switch:
        monkeypatch.setenv(switch, "0")
    q8 = ops.QuantizedSummary(torch.zeros(2, 2, 0, 2, 128, dtype=torch.int8, device=DEV),
                              torch.zeros(2, 2, 0, device=DEV))
    query = torch.randn(2, 8, 128, device=DEV).to(dtype)
    scores, indices = ops.topk_relevancy(query, q8, 3)
    assert bool((indices == -1).all()) and bool(torch.isneginf(scores).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k,sink,recent", [(300, 37, 1, 4), (10, 16, 0, 0), (2000, 512, 4, 8),
                                             (9000, 300, 1, 2)])
@pytest.mark.parametrize("D", [128, 256, 100])
def test_int8_topk_random(dtype, N, k, sink, recent, D):
    B, Hq, Hkv, P = 2, 12, 4, 4
    keys = torch.randn(B, Hkv, N * P, D, device=DEV).to(dtype)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    nvalid = [N, max(N // 3, 1)]
    num_pages = torch.tensor(nvalid, dtype=torch.int32, device=DEV)
    got_s, got_i = ops.topk_relevancy(query, q8, k, num_pages=num_pages, sink_pages=sink,
                                      recent_pages=recent)
    ref = reference.relevancy_scores(query.double(), q8.codes,
                                     summary_scales=q8.scales.double())
    assert_valid_selection(ref.cpu(), got_s.cpu(), got_i.cpu(), k, nvalid, sink, recent)


def test_int8_topk_strided_codes_and_special_pages():
    # Strided codes and scales (the one-code-a-lane kernel), a NaN page (ranks last) and an
    # infinite page (+inf, ranks first).
    B, Hq, Hkv, N, P, D = 2, 8, 2, 200, 8, 64
    keys = torch.randn(B, Hkv, N * P, D, device=DEV)
    keys[0, 0, 5 * P + 1, 3] = float("nan")
    keys[1, 1, 7 * P, 2] = float("-inf")
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    big_codes = torch.zeros(B, Hkv, N + 3, 2, D + 16, dtype=torch.int8, device=DEV)
    big_scales = torch.zeros(B, Hkv, 2 * (N + 3), device=DEV)
    codes = big_codes[:, :, 2 : N + 2, :, 3 : D + 3]
    scales = big_scales[:, :, 4 : 2 * N + 4 : 2]
    codes.copy_(q8.codes)
    scales.copy_(q8.scales)
    query = torch.randn(B, Hq, D, device=DEV)
    got_s, got_i = ops.topk_relevancy(query, ops.QuantizedSummary(codes, scales), 30)
    assert 5 not in got_i[0, 0].tolist() and 7 in got_i[1, 1].tolist()
    assert got_s[1, 1, got_i[1, 1].tolist().index(7)] == math.inf
    ref = reference.relevancy_scores(query.double(), q8.codes,
                                     summary_scales=q8.scales.double()).cpu()
    got_s, got_i = got_s.cpu(), got_i.cpu()
    # Row (1, 1) holds the +inf page, which makes the tolerance of its row infinite: checked above.
    assert_valid_selection(ref[:1].nan_to_num(nan=-math.inf), got_s[:1], got_i[:1], 30, [N], 0, 0)
    assert_valid_selection(ref[1:, :1], got_s[1:, :1], got_i[1:, :1], 30, [N], 0, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_bound_is_never_below_the_exact_bound(dtype):
    # The CUDA int8 scores against the exact (bf16/fp32 summary) bound in float64: never below
    # it beyond the float32 rounding of the score's own sum, and above every key's q.k.
    B, Hq, Hkv, N, P, D = 2, 32, 8, 1024, 16, 128
    keys = (torch.randn(B, Hkv, N * P, D, device=DEV) *
            10.0 ** torch.empty(B, Hkv, N * P, 1, device=DEV).uniform_(-2, 2)).to(dtype)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    exact = ops.prepare_memory(keys, P)
    query = torch.randn(B, Hq, D, device=DEV).to(dtype)
    got, idx = ops.topk_relevancy(query, q8, N)
    assert torch.equal(idx.cpu(), torch.arange(N, dtype=torch.int32).expand(B, Hkv, N))
    want = reference.relevancy_scores(query.double().cpu(), exact.double().cpu())
    magnitude = reference.relevancy_scores(query.double().abs().cpu(),
                                           q8.codes.double().abs().cpu(), group_reduce="sum")
    tol = (D + 4) * 2.0**-23 * magnitude * q8.scales.double().cpu()
    assert bool((got.double().cpu() >= want - tol).all())


def test_int8_decode_step_in_a_cuda_graph():
    B, Hq, Hkv, S, D, P, k = 2, 16, 4, 2048, 128, 16, 32
    keys = torch.randn(B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    query = torch.randn(B, Hq, D, device=DEV, dtype=torch.bfloat16)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")

    def step():
        ops.prepare_memory_(q8, keys, P, S // P - 1, mode="minmax_int8")
        return ops.topk_relevancy(query, q8, k, sink_pages=1, recent_pages=1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_s, graph_i = step()
    keys.copy_(torch.randn_like(keys))
    query.copy_(torch.randn_like(query))
    graph.replay()
    want_s, want_i = step()
    assert torch.equal(graph_i, want_i) and torch.equal(graph_s, want_s)
