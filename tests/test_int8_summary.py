"""Bound-preserving int8 summaries: prepare_memory(mode="minmax_int8"), prepare_memory_ and
topk_relevancy(mode="bound") on them, against the reference, and the bound they preserve."""

import math

import pytest
import torch
from helpers import (
    DTYPES,
    assert_bitwise_equal,
    assert_valid_topk,
    cpu,
    devices,
    dtype_id,
    poisoned_outputs,
    ragged_seq_lens,
    randn,
    score_tolerance,
    strided_cache,
    to_device,
)

from torch_memops import ops, reference

# (B, Hkv, S, D, P): tails, S < P, odd D, one token per page.
SHAPES = [(2, 3, 37, 16, 8), (3, 2, 5, 7, 16), (1, 4, 32, 24, 8), (2, 1, 7, 9, 1),
          (1, 2, 300, 128, 16)]


def quantized(device, keys, page_size, seq_lens=None):
    with poisoned_outputs():
        q8 = ops.prepare_memory(to_device(device, keys), page_size, mode="minmax_int8",
                                seq_lens=to_device(device, seq_lens))
    assert isinstance(q8, ops.QuantizedSummary)
    return ops.QuantizedSummary(*cpu(q8.codes, q8.scales))


def assert_matches_reference(q8, keys, page_size, seq_lens=None):
    codes, scales = reference.prepare_memory_int8(keys, page_size, seq_lens=seq_lens)
    assert q8.codes.dtype == torch.int8 and q8.scales.dtype == torch.float32
    assert_bitwise_equal(q8.codes, codes)
    # Scales compared as values (NaN == NaN): the reference's NaN payload is float64's.
    assert q8.scales.shape == scales.shape
    same = (q8.scales == scales) | (torch.isnan(q8.scales) & torch.isnan(scales))
    assert bool(same.all()), f"{(~same).sum()} scales differ: {q8.scales[~same]} vs {scales[~same]}"


def assert_conservative(q8, keys, page_size, seq_lens=None):
    """Every element of every page with finite keys: codes * scale (exact in float64) bounds the
    exact min from below and the exact max from above; scales are powers of two (or 0)."""
    exact = reference.prepare_memory(keys, page_size, seq_lens=seq_lens).double()
    finite = torch.isfinite(exact).flatten(-2).all(-1)  # [B, H, N]
    s = q8.scales.double()
    lo = q8.codes[..., 0, :].double() * s.unsqueeze(-1)
    hi = q8.codes[..., 1, :].double() * s.unsqueeze(-1)
    ok_lo = (lo <= exact[..., 0, :]).all(-1) | ~finite
    ok_hi = (hi >= exact[..., 1, :]).all(-1) | ~finite
    assert bool(ok_lo.all()), f"{(~ok_lo).sum()} pages have a dequantised min above the min"
    assert bool(ok_hi.all()), f"{(~ok_hi).sum()} pages have a dequantised max below the max"
    fs = s[finite]
    mant, _ = torch.frexp(fs[fs > 0])
    assert bool((mant == 0.5).all()), "a scale is not a power of two"
    assert int(q8.codes.abs().max()) <= 127


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_prepare_int8_matches_reference(device, dtype, shape, ragged):
    B, H, S, D, P = shape
    keys = strided_cache(B, H, S, D, dtype)  # a view of a larger buffer, tokens past S huge
    keys.mul_((10.0 ** torch.empty(B, H, 1, 1).uniform_(-3, 3)).to(dtype))
    assert not keys.is_contiguous()
    seq_lens = ragged_seq_lens(B, S) if ragged else None
    q8 = quantized(device, keys, P, seq_lens)
    assert q8.codes.shape == (B, H, -(-S // P), 2, D) and q8.scales.shape == (B, H, -(-S // P))
    assert_matches_reference(q8, keys, P, seq_lens)
    assert_conservative(q8, keys, P, seq_lens)


def adversarial_keys(dtype, D=13, P=4):
    """Pages of edge values, one page each (P tokens): zeros, -0.0, constants, the dtype's
    largest and smallest (subnormal) magnitudes, values at 127 * 2^e and just past it, single
    outliers, mixed signs of wildly different size."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    big = info.max
    pages = [
        torch.zeros(P, D),
        -torch.zeros(P, D),
        torch.full((P, D), 3.0),
        torch.full((P, D), -127.0),
        torch.full((P, D), 127.0 * 2.0**-3),
        torch.full((P, D), 127.0 * 2.0**-3).nextafter(torch.tensor(1e9)),
        torch.full((P, D), big),
        torch.full((P, D), -big),
        torch.full((P, D), tiny),
        torch.full((P, D), -tiny),
        torch.randn(P, D) * tiny * 8,
        torch.randn(P, D) * big / 8,
        torch.cat([torch.full((P - 1, D), 1e-3), torch.full((1, D), -1e3)]),
        torch.randn(P, D) * (10.0 ** torch.randint(-4, 5, (P, D)).float()),
    ]
    keys = torch.stack(pages).reshape(-1, D)  # [pages * P, D]
    return keys.to(dtype).view(1, 1, -1, D)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_prepare_int8_adversarial_pages(device, dtype):
    keys = adversarial_keys(dtype)
    q8 = quantized(device, keys, 4)
    assert_matches_reference(q8, keys, 4)
    assert_conservative(q8, keys, 4)
    assert q8.scales[0, 0, 0] == 0 and q8.scales[0, 0, 1] == 0  # zero pages
    assert not bool(q8.codes[0, 0, :2].any())


@pytest.mark.parametrize("device", devices())
def test_prepare_int8_every_float32_exponent(device):
    # One token per page, so that min = max = the key: magnitudes 2^-149 .. 2^128 (every binade,
    # random significands, both signs) exercise the exponent choice and the exact rounding.
    D = 16
    n = 4096
    e = torch.randint(-149, 128, (n, D)).double()
    x = (torch.rand(n, D).double() + 1.0) * 2.0**e * torch.where(torch.rand(n, D) < 0.5, -1, 1)
    x = x.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max).float()
    keys = x.view(1, 1, n, D)
    q8 = quantized(device, keys, 1)
    assert_matches_reference(q8, keys, 1)
    assert_conservative(q8, keys, 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_prepare_int8_nan_and_inf_pages(device, dtype):
    keys = randn(1, 2, 16, 8, dtype=dtype)
    keys[0, 0, 1, 3] = math.nan  # page 0 of head 0: NaN
    keys[0, 0, 5, 0] = math.inf  # page 1: +inf
    keys[0, 0, 9, 2] = -math.inf  # page 2: -inf
    keys[0, 1, 12, 5] = math.inf  # head 1 page 3: +inf and NaN: NaN wins
    keys[0, 1, 13, 6] = math.nan
    q8 = quantized(device, keys, 4)
    assert_matches_reference(q8, keys, 4)
    s = q8.scales
    assert math.isnan(s[0, 0, 0]) and math.isnan(s[0, 1, 3])
    assert s[0, 0, 1] == math.inf and s[0, 0, 2] == math.inf
    assert bool((q8.codes[0, 0, 0] == 0).all())
    assert bool((q8.codes[0, 0, 1, 0] == -127).all() and (q8.codes[0, 0, 1, 1] == 127).all())
    assert bool(torch.isfinite(s[0, 0, 3]) and torch.isfinite(s[0, 1, :3]).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("first_page", [0, 2, 5, 9])
def test_prepare_int8_inplace(device, dtype, first_page):
    B, H, S, D, P = 2, 3, 37, 16, 8
    n = -(-S // P)
    keys = strided_cache(B, H, S, D, dtype)
    seq_lens = ragged_seq_lens(B, S)
    codes = torch.randint(-128, 128, (B, H, n + 3, 2, D), dtype=torch.int8)
    scales = torch.randn(B, H, n + 3)
    before = ops.QuantizedSummary(codes.clone(), scales.clone())
    dev = ops.QuantizedSummary(*to_device(device, codes, scales))
    out = ops.prepare_memory_(dev, to_device(device, keys), P, first_page, mode="minmax_int8",
                              seq_lens=to_device(device, seq_lens))
    assert out is dev
    got = ops.QuantizedSummary(*cpu(dev.codes, dev.scales))
    full = reference.prepare_memory_int8(keys, P, seq_lens=seq_lens)
    lo = min(first_page, n)
    assert_bitwise_equal(got.codes[:, :, lo:n], full[0][:, :, lo:])
    assert_bitwise_equal(got.scales[:, :, lo:n], full[1][:, :, lo:])
    assert_bitwise_equal(got.codes[:, :, :lo], before.codes[:, :, :lo])
    assert_bitwise_equal(got.codes[:, :, n:], before.codes[:, :, n:])
    assert_bitwise_equal(got.scales[:, :, :lo], before.scales[:, :, :lo])
    assert_bitwise_equal(got.scales[:, :, n:], before.scales[:, :, n:])


# ------------------------------------------------------------------------------------------------
# topk_relevancy on int8 summaries
# ------------------------------------------------------------------------------------------------


def int8_score_tolerance(query, q8):
    """score_tolerance of the codes, times each page's scale (the scale multiplies exactly)."""
    tol = score_tolerance(query.float(), q8.codes.float(), mode="bound")
    return torch.nan_to_num(tol * q8.scales.abs(), nan=0.0, posinf=0.0)


def run_topk(device, query, q8, k, **kwargs):
    moved = {name: to_device(device, v) if isinstance(v, torch.Tensor) else v
             for name, v in kwargs.items()}
    summary = ops.QuantizedSummary(*to_device(device, q8.codes, q8.scales))
    with poisoned_outputs():
        scores, indices = ops.topk_relevancy(to_device(device, query), summary, k, **moved)
    return cpu(scores, indices)


def page_keys(B, H, S, D, dtype):
    """Keys whose pages differ in magnitude by up to 10^3 each way."""
    scale = 10.0 ** torch.empty(B, H, S, 1).uniform_(-3, 3)
    return (randn(B, H, S, D) * scale).to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
@pytest.mark.parametrize("k", [5, 13, 20], ids=["k<N", "k=N", "k>N"])
def test_topk_int8_matches_reference(device, dtype, G, group_reduce, k):
    B, Hkv, P, D = 2, 2, 4, 24
    keys = page_keys(B, Hkv, 13 * P - 1, D, dtype)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = randn(B, Hkv * G, D, dtype=dtype)
    scores, indices = run_topk(device, query, q8, k, group_reduce=group_reduce)
    ref = reference.relevancy_scores(query, q8.codes, group_reduce=group_reduce,
                                     summary_scales=q8.scales)
    assert_valid_topk(scores, indices, ref, int8_score_tolerance(query, q8), k)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("D", [7, 64, 128, 256])
def test_topk_int8_forced_pages_and_num_pages(device, D):
    B, Hkv, G, P = 3, 2, 4, 8
    N = 70
    keys = page_keys(B, Hkv, N * P, D, torch.bfloat16)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = randn(B, Hkv * G, D, dtype=torch.bfloat16)
    num_pages = torch.tensor([N, 0, 9], dtype=torch.int32)
    kw = dict(num_pages=num_pages, sink_pages=1, recent_pages=2)
    scores, indices = run_topk(device, query, q8, 16, **kw)
    ref = reference.relevancy_scores(query, q8.codes, summary_scales=q8.scales)
    assert_valid_topk(scores, indices, ref, int8_score_tolerance(query, q8), 16, **kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("query_dtype", DTYPES, ids=dtype_id)
def test_topk_int8_query_dtype_independent_of_keys(device, query_dtype):
    # The codes carry no float dtype: a float32 query scores a summary made from bf16 keys.
    keys = page_keys(1, 2, 64, 32, torch.bfloat16)
    q8 = ops.prepare_memory(keys, 8, mode="minmax_int8")
    query = randn(1, 4, 32, dtype=query_dtype)
    scores, indices = run_topk(device, query, q8, 3)
    ref = reference.relevancy_scores(query, q8.codes, summary_scales=q8.scales)
    assert_valid_topk(scores, indices, ref, int8_score_tolerance(query, q8), 3)


def all_page_scores(device, query, summary, group_reduce):
    """The score of every page (k = N: every page taken, in ascending order)."""
    codes = summary.codes if isinstance(summary, ops.QuantizedSummary) else summary
    N = codes.shape[2]
    if isinstance(summary, ops.QuantizedSummary):
        summary = ops.QuantizedSummary(*to_device(device, summary.codes, summary.scales))
    else:
        summary = to_device(device, summary)
    scores, indices = ops.topk_relevancy(to_device(device, query), summary, N,
                                         group_reduce=group_reduce)
    scores, indices = cpu(scores, indices)
    assert bool((indices == torch.arange(N, dtype=torch.int32)).all())
    return scores


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
@pytest.mark.parametrize("D", [9, 64, 128])
def test_int8_bound_never_below_exact_bound_cpu(dtype, G, group_reduce, D):
    # On the CPU both summaries are scored by the same loop (same order of every float32 sum),
    # and a power-of-two scale multiplies without rounding: the int8 score is the float32 bound
    # of the dequantised summary, which is >= the exact summary's bound term by term and so, with
    # monotonic rounding, sum by sum. Checked without tolerance on every page, for keys whose
    # products stay in float32's normal range. Constant and zero pages included.
    B, Hkv, P, N = 2, 2, 16, 96
    keys = page_keys(B, Hkv, N * P, D, dtype)
    keys[0, 0, : 4 * P] = 0  # zero pages
    keys[0, 1, 4 * P : 8 * P] = keys[0, 1, 4 * P]  # constant pages
    keys[1, 0, 8 * P : 12 * P] = torch.tensor(127.0 * 2.0**-5, dtype=dtype)  # exactly 127 * 2^e
    exact = ops.prepare_memory(keys, P)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    for _ in range(4):
        query = randn(B, Hkv * G, D, dtype=dtype) * 10.0 ** float(torch.empty(()).uniform_(-2, 2))
        query = query.to(dtype)
        s8 = all_page_scores("cpu", query, q8, group_reduce)
        sx = all_page_scores("cpu", query, exact, group_reduce)
        below = s8 < sx
        assert not bool(below.any()), (
            f"{int(below.sum())} int8 scores below the exact bound, e.g. {s8[below][:4].tolist()} "
            f"< {sx[below][:4].tolist()}"
        )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_bound_is_an_upper_bound_of_every_key(device, dtype):
    # Any backend, any summation order: the int8 score bounds q.k of every valid key of the
    # page (float64), within the float32 rounding of the score.
    B, Hkv, G, P, D = 2, 2, 4, 8, 40
    S = 25 * P - 3
    keys = page_keys(B, Hkv, S, D, dtype)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    query = randn(B, Hkv * G, D, dtype=dtype)
    N = q8.codes.shape[2]
    s8 = all_page_scores(device, query, q8, "max")
    qd = query.double().view(B, Hkv, G, D)
    k = torch.nn.functional.pad(keys.double(), (0, 0, 0, N * P - S), value=-math.inf)
    dots = torch.einsum("bhgd,bhsd->bhgs", qd, torch.nan_to_num(k, neginf=0.0))
    dots = dots.masked_fill(torch.isinf(k[..., 0]).unsqueeze(2), -math.inf)
    best = dots.view(B, Hkv, G, N, P).amax(-1).amax(2)  # max over heads and tokens
    tol = int8_score_tolerance(query, q8)
    assert bool((s8.double() >= best - tol.double()).all())


@pytest.mark.parametrize("device", devices())
def test_topk_int8_special_pages(device):
    # A NaN page scores NaN and ranks last; an infinite page scores +inf and ranks first; an
    # empty page (past seq_lens) and a zero page score 0.
    D, P = 16, 4
    keys = randn(1, 1, 10 * P, D)
    keys[0, 0, 1, 2] = math.nan  # page 0
    keys[0, 0, 5, 2] = -math.inf  # page 1
    keys[0, 0, 8:12] = 0.0  # page 2
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8", seq_lens=torch.tensor([9 * P], dtype=torch.int32))
    query = randn(1, 2, D)
    s = all_page_scores(device, query, q8, "max")[0, 0]
    assert math.isnan(s[0]) and s[1] == math.inf and s[2] == 0 and s[9] == 0
    scores, indices = run_topk(device, query, q8, 9)
    assert 0 not in indices[0, 0].tolist() and 1 in indices[0, 0].tolist()


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_int8_errors_name_the_argument():
    keys = randn(1, 2, 32, 16)
    q8 = ops.prepare_memory(keys, 8, mode="minmax_int8")
    query = randn(1, 4, 16)
    m = torch.ops.memops
    with pytest.raises(ValueError, match="needs `summary_scales`"):
        m.topk_relevancy(query, q8.codes, 2)
    with pytest.raises(ValueError, match='mode "bound" only'):
        ops.topk_relevancy(query, q8, 2, mode="dot")
    with pytest.raises(RuntimeError, match="`summary_scales` must be float32"):
        m.topk_relevancy(query, q8.codes, 2, summary_scales=q8.scales.double())
    with pytest.raises(RuntimeError, match=r"`summary_scales` must have shape \[B, Hkv, N\]"):
        m.topk_relevancy(query, q8.codes, 2, summary_scales=q8.scales[:, :, :2])
    with pytest.raises(ValueError, match="only used with an int8 `summary`"):
        m.topk_relevancy(query, ops.prepare_memory(keys, 8), 2, summary_scales=q8.scales)
    with pytest.raises(RuntimeError, match="`summary` must be float32, float16, bfloat16 or int8"):
        m.topk_relevancy(query, q8.codes.short(), 2)
    with pytest.raises(RuntimeError, match="memops.prepare_memory_int8: `keys` must be float32"):
        m.prepare_memory_int8(keys.double(), 8)
    codes, scales = q8.codes.clone(), q8.scales.clone()
    with pytest.raises(RuntimeError, match="`summary` must be int8"):
        m.prepare_memory_int8_(codes.short(), scales, keys, 8, 0)
    with pytest.raises(RuntimeError, match="`scales` must be float32"):
        m.prepare_memory_int8_(codes, scales.half(), keys, 8, 0)
    with pytest.raises(RuntimeError, match=r"`scales` must have shape \[B, Hkv, N\]"):
        m.prepare_memory_int8_(codes, scales[:, :, :3], keys, 8, 0)
    with pytest.raises(RuntimeError, match=r"`summary` must have shape \[B, Hkv, >= ceil"):
        m.prepare_memory_int8_(codes[:, :, :2], scales[:, :, :2], keys, 8, 0)
    with pytest.raises(ValueError, match="`seq_lens\\[0\\]` = 40"):
        m.prepare_memory_int8_(codes, scales, keys, 8, 0, seq_lens=torch.tensor([40],
                                                                                dtype=torch.int32))
    assert torch.equal(codes, q8.codes) and torch.equal(scales, q8.scales)  # nothing written


def int8_step(q8, keys, query, first_page):
    ops.prepare_memory_(q8, keys, 8, first_page, mode="minmax_int8")
    return ops.topk_relevancy(query, q8, 3, sink_pages=1)


@pytest.mark.parametrize("device", devices())
def test_int8_decode_step_compiles_fullgraph(device):
    keys = to_device(device, randn(2, 2, 45, 16, dtype=torch.bfloat16))
    query = to_device(device, randn(2, 8, 16, dtype=torch.bfloat16))
    base = ops.prepare_memory(keys[:, :, :40], 8, mode="minmax_int8")
    eager_q8 = ops.QuantizedSummary(torch.zeros_like(base.codes[:, :, :1]).repeat(1, 1, 8, 1, 1),
                                    torch.zeros(2, 2, 8, device=keys.device))
    compiled_q8 = ops.QuantizedSummary(eager_q8.codes.clone(), eager_q8.scales.clone())
    eager = int8_step(eager_q8, keys, query, 0)
    torch._dynamo.reset()
    compiled = torch.compile(int8_step, fullgraph=True)(compiled_q8, keys, query, 0)
    for got, want in zip((*compiled, *compiled_q8), (*eager, *eager_q8)):
        assert_bitwise_equal(cpu(got), cpu(want))
