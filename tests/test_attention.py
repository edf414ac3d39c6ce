"""sparse_apply and merge_attention against the reference and against plain softmax attention."""

import math

import pytest
import torch
from helpers import (
    DTYPES,
    ROUNDED_TOL,
    ascending_indices,
    cpu,
    devices,
    dtype_id,
    poisoned_outputs,
    ragged_seq_lens,
    randn,
    reference_attention_fp64,
    strided_cache,
    to_device,
)

from torch_memops import ops, reference

GQA_RATIOS = [1, 3, 4, 8]
# lse is a float32 log of a float32 sum of at most ~100 exponentials: both sides agree to a few
# float32 ulps of values of magnitude < 20, far inside 1e-5 relative + 1e-5 absolute.
LSE_TOL = dict(rtol=1e-5, atol=1e-5)


def apply(device, query, k_cache, v_cache, indices, page_size, **kwargs):
    if kwargs.get("seq_lens") is not None:
        kwargs["seq_lens"] = to_device(device, kwargs["seq_lens"])
    with poisoned_outputs():
        out, lse = ops.sparse_apply(*to_device(device, query, k_cache, v_cache),
                                    to_device(device, indices), page_size, **kwargs)
    return cpu(out, lse)


def assert_attention_close(out, lse, ref_out, ref_lse, dtype):
    # Both sides accumulate in float32 and round the output once to `dtype` (ROUNDED_TOL).
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **ROUNDED_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("G", GQA_RATIOS)
@pytest.mark.parametrize("index_heads", ["kv", "q", "dense"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_sparse_apply_matches_reference(device, dtype, G, index_heads, ragged):
    B, Hkv, S, D, P, k = 3, 2, 37, 16, 8, 3
    query = randn(B, Hkv * G, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    heads = {"kv": Hkv, "q": Hkv * G}.get(index_heads)
    indices = None if heads is None else ascending_indices(B, heads, k, -(-S // P))
    seq_lens = ragged_seq_lens(B, S) if ragged else None
    out, lse = apply(device, query, k_cache, v_cache, indices, P, seq_lens=seq_lens)
    ref_out, ref_lse = reference.sparse_apply(query, k_cache, v_cache, indices, P,
                                              seq_lens=seq_lens)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 4, 5, 8, 16, 3), (1, 2, 24, 32, 8, 3), (2, 8, 19, 8, 4, 9)],
                         ids=["S<P", "k=N", "k>N"])
def test_sparse_apply_edge_shapes_and_scale(device, dtype, shape):
    B, Hq, S, D, P, k = shape
    query = randn(B, Hq, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, 2, S, D, dtype), strided_cache(B, 2, S, D, dtype)
    indices = ascending_indices(B, 2, k, -(-S // P))
    out, lse = apply(device, query, k_cache, v_cache, indices, P, scale=0.3)
    ref_out, ref_lse = reference.sparse_apply(query, k_cache, v_cache, indices, P, scale=0.3)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("G", GQA_RATIOS)
def test_dense_equals_softmax_attention_in_float64(device, dtype, G):
    # indices=None is plain softmax attention. Ground truth: float64 SDPA on the same (upcast)
    # inputs. The kernel accumulates in float32 over S = 50 tokens (error ~1e-6) and rounds the
    # output once to `dtype`: ROUNDED_TOL. The float64 reference must agree to 1e-12.
    B, Hkv, S, D = 2, 2, 50, 32
    query = randn(B, Hkv * G, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    truth = reference_attention_fp64(query, k_cache, v_cache)
    out, lse = apply(device, query, k_cache, v_cache, None, 16)
    torch.testing.assert_close(out.double(), truth, **ROUNDED_TOL[dtype])
    logits = torch.einsum("bhd,bhsd->bhs", query.double(),
                          k_cache.double().repeat_interleave(G, 1)) * D**-0.5
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), **LSE_TOL)
    ref64, _ = reference.sparse_apply(query.double(), k_cache.double(), v_cache.double(), None,
                                      16, compute_dtype=torch.float64)
    torch.testing.assert_close(ref64, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_without_tokens_give_zero_and_minus_inf(device, dtype):
    # Row 0 has seq_lens = 0; row 1 selects only padding; row 2 selects a page past its length.
    B, Hkv, S, D, P = 3, 2, 24, 8, 8
    query = randn(B, 4, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    seq_lens = torch.tensor([0, 24, 9], dtype=torch.int32)
    indices = torch.tensor([[[0, 1]] * Hkv, [[-1, -1]] * Hkv, [[2, -1]] * Hkv], dtype=torch.int32)
    out, lse = apply(device, query, k_cache, v_cache, indices, P, seq_lens=seq_lens)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, -math.inf))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("split", [16, 21])
def test_merge_of_two_halves_equals_attention_over_the_whole(device, dtype, split):
    B, Hkv, G, S, D, P = 2, 2, 4, 40, 16, 8
    query = randn(B, Hkv * G, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    first = apply(device, query, k_cache[:, :, :split], v_cache[:, :, :split], None, P)
    second = apply(device, query, k_cache[:, :, split:], v_cache[:, :, split:], None, P)
    whole_out, whole_lse = apply(device, query, k_cache, v_cache, None, P)
    with poisoned_outputs():
        out, lse = ops.merge_attention(*to_device(device, *first, *second))
    torch.testing.assert_close(cpu(lse), whole_lse, **LSE_TOL)
    # Each half's output was rounded to `dtype` (relative error <= eps / 2 of that half), and
    # the halves can cancel, so the error bound scales with w_a |out_a| + w_b |out_b|, plus one
    # rounding of each result; for float32, eps = 2**-17 covers accumulating S = 40 tokens in
    # different orders (a few dozen float32 ulps).
    eps = {torch.float32: 2.0**-17, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    w_a = (first[1] - whole_lse).exp().unsqueeze(-1)
    w_b = (second[1] - whole_lse).exp().unsqueeze(-1)
    scale = w_a * first[0].float().abs() + w_b * second[0].float().abs() + whole_out.float().abs()
    error = (cpu(out).float() - whole_out.float()).abs()
    assert bool((error <= eps * scale + 1e-6).all()), f"max error {float(error.max())}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_merge_matches_reference(device, dtype, lead):
    D = 24
    out_a, out_b = randn(*lead, D, dtype=dtype), randn(*lead, D, dtype=dtype)
    lse_a, lse_b = randn(*lead) * 3, randn(*lead) * 3
    lse_a.view(-1)[0] = -math.inf  # one side empty: the other passes through
    lse_a.view(-1)[-1] = lse_b.view(-1)[-1] = -math.inf  # both empty: 0, -inf
    out_a.view(-1, D)[-1] = out_b.view(-1, D)[-1] = 0
    with poisoned_outputs():
        out, lse = ops.merge_attention(*to_device(device, out_a, lse_a, out_b, lse_b))
    out, lse = cpu(out, lse)
    ref_out, ref_lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, **ROUNDED_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
    assert torch.equal(out.view(-1, D)[0], out_b.view(-1, D)[0])
    assert torch.equal(out.view(-1, D)[-1], torch.zeros(D, dtype=dtype))
    assert lse.view(-1)[-1] == -math.inf


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_merge_with_infinite_or_nan_lse(device, dtype):
    # docs/design.md, Decisions: a part with lse = +inf takes all the weight, two such parts
    # share it equally, the merged lse is +inf; a NaN lse gives a NaN row.
    inf, nan = math.inf, math.nan
    out_a, out_b = randn(5, 16, dtype=dtype), randn(5, 16, dtype=dtype)
    lse_a = torch.tensor([inf, inf, 0.5, nan, 2.0])
    lse_b = torch.tensor([0.3, inf, -inf, 1.0, inf])
    with poisoned_outputs():
        out, lse = ops.merge_attention(*to_device(device, out_a, lse_a, out_b, lse_b))
    out, lse = cpu(out, lse)
    ref_out, ref_lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out[0], out_a[0]) and torch.equal(out[4], out_b[4])
    assert torch.equal(out[1], ((0.5 * out_a[1].float()) + (0.5 * out_b[1].float())).to(dtype))
    assert lse[[0, 1, 4]].tolist() == [inf, inf, inf]
    assert out[3].isnan().all() and lse[3].isnan()


@pytest.mark.parametrize("device", devices())
def test_merge_of_strided_inputs(device):
    out_a = randn(3, 8, 16)[:, ::2]
    out_b, lse_a, lse_b = randn(3, 4, 16), randn(3, 8)[:, 1::2], randn(3, 4)
    out, lse = cpu(*ops.merge_attention(*to_device(device, out_a, lse_a, out_b, lse_b)))
    ref_out, ref_lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, **ROUNDED_TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device", devices())
def test_empty_cache_through_the_pipeline(device):
    # S = 0: no pages, nothing to select, gather or attend to.
    B, Hkv, G, D, P, k = 2, 2, 3, 8, 4, 3
    keys, query = randn(B, Hkv, 0, D), randn(B, Hkv * G, D)
    summary = ops.prepare_memory(to_device(device, keys), P)
    assert summary.shape == (B, Hkv, 0, 2, D)
    scores, indices = cpu(*ops.topk_relevancy(to_device(device, query), summary, k))
    assert torch.equal(indices, torch.full((B, Hkv, k), -1, dtype=torch.int32))
    assert torch.equal(scores, torch.full((B, Hkv, k), -math.inf))
    gathered, lengths = cpu(*ops.gather_retrieve(*to_device(device, keys, indices), P))
    assert torch.equal(gathered, torch.zeros(B, Hkv, k * P, D))
    assert torch.equal(lengths, torch.zeros(B, Hkv, dtype=torch.int32))
    for selection in (None, indices):
        out, lse = apply(device, query, keys, keys, selection, P)
        assert torch.equal(out, torch.zeros(B, Hkv * G, D))
        assert torch.equal(lse, torch.full((B, Hkv * G), -math.inf))
