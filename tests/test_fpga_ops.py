"""memops ops on the fpga device (HLS kernels through the runtime) against the CPU backend.

Everything is compared bit for bit with ``torch.equal``: gather is a copy; prepare_memory and the
relevancy scores run the same float32 arithmetic in the same order as the CPU backend (the HLS
kernels call the functions of ``csrc/include/memops/relevancy.h``, mirror ``summarise_page`` of
``prepare_memory.h`` and narrow to fp16/bf16 with c10's rounding), so equal selections follow.
The CPU backend itself is tested against ``torch_memops/reference.py`` in its own tests.

The kernels move 512-bit words. Most cases use head dims that span whole words (as the usual
D = 64, 128, 256 do); the ``*_any_head_dim`` tests run every other D the CPU accepts, which the
backend pads to whole words internally, and must match the CPU just as exactly.
"""

import math

import pytest
import torch

import torch_memops
from torch_memops import ops

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dim_for(dtype, words=1):
    return words * 64 // torch.empty(0, dtype=dtype).element_size()


def fpga(t):
    return None if t is None else t.to("fpga")


def strided_keys(B, H, S, D, dtype, extra=9):
    """A view keys[:, :, :S] of a larger preallocated buffer, on the CPU and on the fpga."""
    buffer = torch.randn(B, H, S + extra, D).to(dtype)
    return buffer[:, :, :S], buffer.to("fpga")[:, :, :S]


# --- prepare_memory -----------------------------------------------------------------------------

PREPARE_SHAPES = [
    # B, H, S, P, seq_lens
    (2, 3, 45, 8, None),  # S not a multiple of P
    (1, 2, 5, 16, None),  # S < P
    (3, 2, 40, 16, [40, 0, 17]),  # ragged, with an empty row
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
@pytest.mark.parametrize("shape", PREPARE_SHAPES, ids=str)
def test_prepare_memory_matches_cpu(dtype, mode, shape):
    B, H, S, P, lens = shape
    D = dim_for(dtype, words=2)
    keys, keys_f = strided_keys(B, H, S, D, dtype)
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    expected = ops.prepare_memory(keys, P, mode=mode, seq_lens=seq_lens)
    got = ops.prepare_memory(keys_f, P, mode=mode, seq_lens=fpga(seq_lens))
    assert got.device.type == "fpga"
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
def test_prepare_memory_inplace_matches_cpu(dtype, mode):
    B, H, S, P, first_page = 2, 2, 50, 8, 3
    D = dim_for(dtype)
    keys, keys_f = strided_keys(B, H, S, D, dtype)
    seq_lens = torch.tensor([50, 29], dtype=torch.int32)
    R = 2 if mode == "minmax" else 1
    # A preallocated summary with more pages than the keys cover, poisoned.
    poison = torch.full((B, H, 10, R, D), -777.0).to(dtype)
    expected = poison.clone()
    ops.prepare_memory_(expected, keys, P, first_page, mode=mode, seq_lens=seq_lens)
    got = poison.to("fpga")
    ops.prepare_memory_(got, keys_f, P, first_page, mode=mode, seq_lens=fpga(seq_lens))
    assert torch.equal(got.cpu(), expected)


# --- topk_relevancy -----------------------------------------------------------------------------

TOPK_CASES = [
    # mode, B, Hq, Hkv, N, k, sink, recent, group_reduce, num_pages
    ("bound", 2, 8, 8, 37, 6, 1, 2, "max", None),  # GQA ratio 1
    ("bound", 2, 12, 4, 29, 8, 0, 1, "sum", [29, 4]),  # ratio 3, k > valid pages in a row
    ("dot", 3, 16, 4, 23, 5, 2, 0, "max", [23, 0, 11]),  # ratio 4, an empty row
    ("dot", 1, 16, 2, 40, 41, 0, 0, "sum", None),  # ratio 8, k > N
    ("indexer", 2, 8, 1, 33, 7, 1, 1, "max", [33, 20]),
]


def relevancy_inputs(mode, B, Hq, Hkv, N, dtype, D):
    query = torch.randn(B, Hq, D).to(dtype)
    if mode == "bound":
        keys = torch.randn(B, Hkv, N * 4, D).to(dtype)
        summary = ops.prepare_memory(keys, 4)
    elif mode == "dot":
        summary = torch.randn(B, Hkv, N, 3, D).to(dtype)
    else:
        summary = torch.randn(B, 1, N, 1, D).to(dtype)
    weights = torch.rand(B, Hq) if mode == "indexer" else None
    return query, summary, weights


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"{c[0]}-G{c[2] // c[3]}-k{c[5]}")
def test_topk_relevancy_matches_cpu(dtype, case):
    mode, B, Hq, Hkv, N, k, sink, recent, reduce, pages = case
    D = dim_for(dtype)
    query, summary, weights = relevancy_inputs(mode, B, Hq, Hkv, N, dtype, D)
    num_pages = None if pages is None else torch.tensor(pages, dtype=torch.int32)
    kwargs = dict(mode=mode, sink_pages=sink, recent_pages=recent, group_reduce=reduce)
    scores, indices = ops.topk_relevancy(
        query, summary, k, num_pages=num_pages, weights=weights, **kwargs
    )
    f_scores, f_indices = ops.topk_relevancy(
        fpga(query), fpga(summary), k, num_pages=fpga(num_pages), weights=fpga(weights), **kwargs
    )
    assert f_indices.device.type == "fpga" and f_scores.dtype == torch.float32
    assert torch.equal(f_indices.cpu(), indices)
    assert torch.equal(f_scores.cpu(), scores)


def test_topk_relevancy_k_2048_on_a_strided_summary():
    B, Hq, Hkv, N, D, k = 1, 4, 2, 2600, 16, 2048
    query = torch.randn(B, Hq, D)
    buffer = torch.randn(B, Hkv, N + 100, 2, D)
    summary = torch.stack([buffer.amin(3), buffer.amax(3)], dim=3)
    view, view_f = summary[:, :, :N], summary.to("fpga")[:, :, :N]
    kwargs = dict(sink_pages=3, recent_pages=16)
    scores, indices = ops.topk_relevancy(query, view, k, **kwargs)
    f_scores, f_indices = ops.topk_relevancy(query.to("fpga"), view_f, k, **kwargs)
    assert torch.equal(f_indices.cpu(), indices)
    assert torch.equal(f_scores.cpu(), scores)


def test_topk_relevancy_ties_and_nan_follow_the_rules():
    # Integer data: many exactly equal scores (ties go to the lower page) and one NaN page
    # (ranked as -inf, reported as NaN).
    B, Hkv, N, D, k = 1, 1, 30, 16, 10
    query = torch.randint(-1, 2, (B, 2, D)).float()
    summary = torch.randint(-1, 2, (B, Hkv, N, 1, D)).float()
    summary[0, 0, 5] = math.nan
    scores, indices = ops.topk_relevancy(query, summary, k, mode="dot")
    f_scores, f_indices = ops.topk_relevancy(fpga(query), fpga(summary), k, mode="dot")
    assert torch.equal(f_indices.cpu(), indices)
    assert torch.equal(f_scores.cpu(), scores)


# --- gather_retrieve ----------------------------------------------------------------------------

GATHER_DTYPES = FLOAT_DTYPES + [torch.uint8, torch.int32]


def random_indices(B, H, k, N):
    """Ascending valid pages padded with -1 at the end, a different count per row."""
    indices = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            count = int(torch.randint(0, min(k, N) + 1, ()))
            indices[b, h, :count] = torch.randperm(N)[:count].sort().values.to(torch.int32)
    return indices


@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 45, 8, 4, [45, 0]), (1, 2, 7, 16, 3, None),
                                   (3, 1, 64, 16, 6, [64, 33, 16])], ids=str)
def test_gather_retrieve_matches_cpu(dtype, shape):
    B, H, S, P, k, lens = shape
    check_gather_matches_cpu(dtype, B, H, S, dim_for(dtype), P, k, lens)


def check_gather_matches_cpu(dtype, B, H, S, D, P, k, lens):
    """gather_retrieve on fpga tensors (a strided view of a longer buffer) equals the CPU bit for bit."""
    if dtype.is_floating_point:
        buffer = torch.randn(B, H, S + 5, D).to(dtype)
    else:
        buffer = torch.randint(0, 120, (B, H, S + 5, D), dtype=dtype)
    memory, memory_f = buffer[:, :, :S], buffer.to("fpga")[:, :, :S]
    indices = random_indices(B, H, k, -(-S // P))
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    out, lengths = ops.gather_retrieve(memory, indices, P, seq_lens=seq_lens)
    f_out, f_lengths = ops.gather_retrieve(memory_f, fpga(indices), P, seq_lens=fpga(seq_lens))
    assert f_out.device.type == "fpga"
    assert f_out.shape == out.shape and f_out.is_contiguous()
    assert torch.equal(f_out.cpu(), out)
    assert torch.equal(f_lengths.cpu(), lengths)


# D = 32 in float16 fills whole 512-bit words; D = 24 in bfloat16 (48-byte rows) takes the padded path.
@pytest.mark.parametrize("dtype,Hq,S,D,k,lens", [(torch.float16, 8, 200, 32, 5, [200, 77]),
                                                 (torch.bfloat16, 6, 150, 24, 4, [150, 61])],
                         ids=["D32-fp16", "D24-bf16"])
def test_pipeline_on_fpga_matches_cpu(dtype, Hq, S, D, k, lens):
    B, Hkv, P = 2, 2, 16
    keys = torch.randn(B, Hkv, S, D, dtype=dtype)
    query = torch.randn(B, Hq, D, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)

    def pipeline(q, k_cache, lens):
        summary = ops.prepare_memory(k_cache, P, seq_lens=lens)
        num_pages = (lens + P - 1) // P
        _, indices = ops.topk_relevancy(q, summary, k, num_pages=num_pages, recent_pages=1)
        return ops.gather_retrieve(k_cache, indices, P, seq_lens=lens)

    out, lengths = pipeline(query, keys, seq_lens)
    f_out, f_lengths = pipeline(fpga(query), fpga(keys), fpga(seq_lens))
    assert torch.equal(f_out.cpu(), out)
    assert torch.equal(f_lengths.cpu(), lengths)


def test_opcheck_on_fpga_tensors():
    keys = torch.randn(1, 2, 40, 32).to("fpga")
    summary = ops.prepare_memory(keys, 16)
    indices = torch.tensor([[[0, 2, -1]] * 2], dtype=torch.int32).to("fpga")
    query = torch.randn(1, 4, 32).to("fpga")
    cases = [
        (torch.ops.memops.prepare_memory.default, (keys, 16)),
        (torch.ops.memops.topk_relevancy.default, (query, summary, 2)),
        (torch.ops.memops.gather_retrieve.default, (keys, indices, 16)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --- errors -------------------------------------------------------------------------------------


def test_apply_on_fpga_names_the_placement():
    q = torch.randn(1, 4, 32).to("fpga")
    cache = torch.randn(1, 2, 16, 32).to("fpga")
    with pytest.raises(RuntimeError, match='place Apply on "cuda" or "cpu"'):
        ops.sparse_apply(q, cache, cache, None, 4)
    out, lse = torch.randn(2, 32).to("fpga"), torch.randn(2).to("fpga")
    with pytest.raises(RuntimeError, match='place Apply on "cuda" or "cpu"'):
        ops.merge_attention(out, lse, out, lse)


def test_mixed_devices_raise():
    keys = torch.randn(1, 2, 16, 32)
    with pytest.raises(RuntimeError, match="`seq_lens` is on cpu but `keys` is on fpga"):
        ops.prepare_memory(keys.to("fpga"), 4, seq_lens=torch.tensor([16], dtype=torch.int32))
    summary = ops.prepare_memory(keys, 4)
    with pytest.raises(RuntimeError, match="`summary` is on"):
        ops.topk_relevancy(torch.randn(1, 2, 32).to("fpga"), summary, 2)
    with pytest.raises(RuntimeError, match="`indices` is on"):
        ops.gather_retrieve(keys.to("fpga"), torch.zeros(1, 2, 1, dtype=torch.int32), 4)


def test_layout_and_limits_raise_before_any_write():
    with pytest.raises(ValueError, match="the last dim of `query` must be <= 256"):
        ops.topk_relevancy(torch.randn(1, 1, 264).to("fpga"),
                           torch.randn(1, 1, 4, 1, 264).to("fpga"), 2, mode="dot")
    summary = torch.randn(1, 1, 3000, 1, 16).to("fpga")
    with pytest.raises(ValueError, match="`k` must be <= 2048"):
        ops.topk_relevancy(torch.randn(1, 1, 16).to("fpga"), summary, 2049, mode="dot")
    with pytest.raises(ValueError, match="at most 64 query heads per kv head"):
        ops.topk_relevancy(torch.randn(1, 66, 16).to("fpga"),
                           torch.randn(1, 1, 4, 1, 16).to("fpga"), 2, mode="dot")
    poison = torch.full((1, 1, 4, 2, 16), 5.0)
    target = poison.to("fpga")
    with pytest.raises(ValueError, match="seq_lens"):
        ops.prepare_memory_(target, torch.randn(1, 1, 16, 16).to("fpga"), 4, 0,
                            seq_lens=torch.tensor([99], dtype=torch.int32).to("fpga"))
    assert torch.equal(target.cpu(), poison)
    with pytest.raises(ValueError, match="outside"):
        ops.gather_retrieve(torch.randn(1, 1, 16, 16).to("fpga"),
                            torch.tensor([[[9]]], dtype=torch.int32).to("fpga"), 4)


def test_fpga_results_are_usable_by_ordinary_torch_code():
    keys = torch.randn(1, 2, 64, 32)
    summary = torch_memops.prepare_memory(keys.to("fpga"), 16)
    assert torch.equal((summary * 2).cpu(), ops.prepare_memory(keys, 16) * 2)


# --- int8 summaries (prepare_memory mode="minmax_int8", topk_relevancy on codes + scales) --------
# The HLS kernels quantise with quantize.h and score the codes with relevancy.h in the CPU's
# order, so codes, scales, scores and selections equal the CPU backend's bit for bit. Codes are
# moved in words of 64: D % 64 == 0.


def int8_keys(B, H, S, D, dtype, extra=7):
    magnitude = 2.0 ** torch.randint(-10, 11, (B, H, S + extra, 1)).float()
    buffer = (torch.randn(B, H, S + extra, D) * magnitude).to(dtype)
    return buffer[:, :, :S], buffer.to("fpga")[:, :, :S]


def assert_same_int8(got, want):
    assert got.codes.device.type == "fpga" and got.codes.dtype == torch.int8
    assert torch.equal(got.codes.cpu(), want.codes)
    assert torch.equal(got.scales.cpu().view(torch.int32), want.scales.view(torch.int32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", PREPARE_SHAPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_prepare_memory_int8_matches_cpu(dtype, shape, D):
    B, H, S, P, lens = shape
    keys, keys_f = int8_keys(B, H, S, D, dtype)
    if S > P:
        keys[0, 0, 1, 3] = math.nan
        keys[-1, -1, P, 2] = -math.inf
        keys_f[0, 0, 1, 3] = math.nan
        keys_f[-1, -1, P, 2] = -math.inf
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    want = ops.prepare_memory(keys, P, mode="minmax_int8", seq_lens=seq_lens)
    got = ops.prepare_memory(keys_f, P, mode="minmax_int8", seq_lens=fpga(seq_lens))
    assert_same_int8(got, want)


def test_prepare_memory_int8_inplace_matches_cpu():
    B, H, S, P, first_page, D = 2, 2, 50, 8, 3, 128
    keys, keys_f = int8_keys(B, H, S, D, torch.bfloat16)
    seq_lens = torch.tensor([50, 29], dtype=torch.int32)
    codes = torch.full((B, H, 10, 2, D), -77, dtype=torch.int8)
    scales = torch.full((B, H, 10), -777.0)
    want = ops.QuantizedSummary(codes.clone(), scales.clone())
    ops.prepare_memory_(want, keys, P, first_page, mode="minmax_int8", seq_lens=seq_lens)
    got = ops.QuantizedSummary(codes.to("fpga"), scales.to("fpga"))
    ops.prepare_memory_(got, keys_f, P, first_page, mode="minmax_int8", seq_lens=fpga(seq_lens))
    assert_same_int8(got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in TOPK_CASES if c[0] == "bound"] +
                         [("bound", 3, 16, 4, 23, 5, 2, 0, "max", [23, 0, 11]),
                          ("bound", 1, 28, 4, 300, 41, 1, 4, "sum", None)],
                         ids=lambda c: f"G{c[2] // c[3]}-k{c[5]}")
@pytest.mark.parametrize("D", [64, 256])
def test_topk_relevancy_int8_matches_cpu(dtype, case, D):
    _, B, Hq, Hkv, N, k, sink, recent, reduce, pages = case
    keys = torch.randn(B, Hkv, N * 4, D) * 2.0 ** torch.randint(-6, 7, (B, Hkv, N * 4, 1))
    keys[0, 0, 5, 1] = math.nan  # page 1: NaN, ranks last
    q8 = ops.prepare_memory(keys.to(dtype), 4, mode="minmax_int8")
    query = torch.randn(B, Hq, D).to(dtype)
    num_pages = None if pages is None else torch.tensor(pages, dtype=torch.int32)
    kwargs = dict(sink_pages=sink, recent_pages=recent, group_reduce=reduce)
    scores, indices = ops.topk_relevancy(query, q8, k, num_pages=num_pages, **kwargs)
    q8_f = ops.QuantizedSummary(q8.codes.to("fpga"), q8.scales.to("fpga"))
    f_scores, f_indices = ops.topk_relevancy(fpga(query), q8_f, k, num_pages=fpga(num_pages),
                                             **kwargs)
    assert f_indices.device.type == "fpga"
    assert torch.equal(f_indices.cpu(), indices)
    assert torch.equal(f_scores.cpu().view(torch.int32), scores.view(torch.int32))


def test_int8_on_fpga_needs_whole_words_of_codes():
    keys = torch.randn(1, 2, 32, 32).to("fpga")  # float32 D 32: whole key words, half a code word
    with pytest.raises(ValueError, match="int8 summaries need `summary` laid out in whole 64-byte words"):
        ops.prepare_memory(keys, 8, mode="minmax_int8")


# --- any head dim: rows that are not whole 512-bit words -----------------------------------------

# 1 and 3: rows of a few bytes; 24: 48 bytes in 16-bit dtypes (the case the kernels refused);
# 40 and 100: a word and a tail; 300: wider than the 256-element row buffer (prepare runs in
# column chunks, gather has no row buffer).
ODD_DIMS = [1, 3, 24, 40, 100, 300]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", ODD_DIMS)
def test_prepare_memory_any_head_dim(dtype, D):
    B, H, S, P = 2, 3, 45, 8
    keys, keys_f = strided_keys(B, H, S, D, dtype)
    seq_lens = torch.tensor([45, 13], dtype=torch.int32)
    for mode in ("minmax", "mean"):
        expected = ops.prepare_memory(keys, P, mode=mode, seq_lens=seq_lens)
        got = ops.prepare_memory(keys_f, P, mode=mode, seq_lens=fpga(seq_lens))
        assert got.shape == expected.shape and got.is_contiguous()
        assert torch.equal(got.cpu(), expected)
        # In place, from page 3, into a poisoned preallocated summary with spare pages.
        R = 2 if mode == "minmax" else 1
        poison = torch.full((B, H, 9, R, D), -777.0).to(dtype)
        expected_ = poison.clone()
        ops.prepare_memory_(expected_, keys, P, 3, mode=mode, seq_lens=seq_lens)
        got_ = poison.to("fpga")
        ops.prepare_memory_(got_, keys_f, P, 3, mode=mode, seq_lens=fpga(seq_lens))
        assert torch.equal(got_.cpu(), expected_)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 3, 24, 40, 100, 250])
@pytest.mark.parametrize("mode", ["bound", "dot", "indexer"])
def test_topk_relevancy_any_head_dim(dtype, D, mode):
    B, Hq, Hkv, N, k = 2, 8, 1 if mode == "indexer" else 2, 30, 7
    query, summary, weights = relevancy_inputs(mode, B, Hq, Hkv, N + 4, dtype, D)
    view, view_f = summary[:, :, :N], summary.to("fpga")[:, :, :N]  # a strided summary
    num_pages = torch.tensor([N, 11], dtype=torch.int32)
    kwargs = dict(mode=mode, sink_pages=1, recent_pages=1)
    scores, indices = ops.topk_relevancy(query, view, k, num_pages=num_pages, weights=weights,
                                         **kwargs)
    f_scores, f_indices = ops.topk_relevancy(fpga(query), view_f, k, num_pages=fpga(num_pages),
                                             weights=fpga(weights), **kwargs)
    assert torch.equal(f_indices.cpu(), indices)
    assert torch.equal(f_scores.cpu(), scores)


@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=str)
@pytest.mark.parametrize("D", ODD_DIMS)
def test_gather_retrieve_any_head_dim(dtype, D):
    check_gather_matches_cpu(dtype, 2, 3, 45, D, 8, 4, [45, 30])


def test_indexer_nan_propagates_as_on_the_cpu():
    B, Hi, N, D, k = 2, 4, 12, 32, 12
    query = torch.randint(-4, 5, (B, Hi, D)).float()
    keys = torch.randint(-4, 5, (B, 1, N, 1, D)).float()
    weights = torch.randint(1, 4, (B, Hi)).float()
    keys[0, 0, 3, 0, 5] = math.nan  # a NaN page
    query[1, 2, 0] = math.nan  # a NaN head: every page of row 1
    scores, indices = ops.topk_relevancy(query, keys, k, mode="indexer", weights=weights)
    f_scores, f_indices = ops.topk_relevancy(fpga(query), fpga(keys), k, mode="indexer",
                                             weights=fpga(weights))
    assert torch.isnan(scores[0, 0, 3]) and torch.isnan(scores[1]).all()
    assert torch.equal(f_indices.cpu(), indices)
    torch.testing.assert_close(f_scores.cpu(), scores, rtol=0, atol=0, equal_nan=True)


def test_inputs_that_require_grad_are_refused_on_fpga():
    keys = torch.randn(1, 2, 40, 32).to("fpga").requires_grad_()
    with pytest.raises(RuntimeError, match="`keys` requires grad.*torch.no_grad"):
        ops.prepare_memory(keys, 16)
    with torch.no_grad():
        assert ops.prepare_memory(keys, 16).grad_fn is None
