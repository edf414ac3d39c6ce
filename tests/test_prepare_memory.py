"""prepare_memory and prepare_memory_ against the reference."""

import pytest
import torch
from helpers import (
    DTYPES,
    ROUNDED_TOL,
    assert_bitwise_equal,
    cpu,
    devices,
    dtype_id,
    poisoned_outputs,
    ragged_seq_lens,
    randn,
    strided_cache,
    to_device,
)

from torch_memops import ops, reference

# (B, Hkv, S, D, P): S not a multiple of P, S < P, S a multiple of P, one token per page.
SHAPES = [(2, 3, 37, 16, 8), (3, 2, 5, 8, 16), (1, 4, 32, 24, 8), (2, 1, 7, 8, 1)]


def mean_tolerance(dtype):
    # The mean is a float32 sum of at most P <= 16 terms |x| < 6 (randn), in another order than
    # torch.mean: the sums differ by at most 2 * 16 * 2**-24 * 16 * 6 < 1e-4 before the division
    # by P, under 1e-5 after it; then one rounding to `dtype` may land on the neighbour.
    tol = dict(ROUNDED_TOL[dtype])
    tol["atol"] = max(tol["atol"], 1e-5)
    return tol


def assert_summary_matches(actual, expected, mode, dtype):
    if mode == "minmax":
        # min and max of stored values are stored values: exact.
        assert_bitwise_equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **mean_tolerance(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_prepare_memory_matches_reference(device, dtype, mode, shape, ragged):
    B, H, S, D, P = shape
    keys = strided_cache(B, H, S, D, dtype)
    seq_lens = ragged_seq_lens(B, S) if ragged else None
    with poisoned_outputs():
        summary = ops.prepare_memory(to_device(device, keys), P, mode=mode,
                                     seq_lens=to_device(device, seq_lens))
    expected = reference.prepare_memory(keys, P, mode=mode, seq_lens=seq_lens)
    assert summary.shape == (B, H, -(-S // P), 2 if mode == "minmax" else 1, D)
    assert summary.dtype == dtype
    assert_summary_matches(cpu(summary), expected, mode, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
def test_summary_of_contiguous_and_strided_keys_is_identical(device, dtype, mode):
    keys = strided_cache(2, 3, 29, 16, dtype)
    strided = ops.prepare_memory(to_device(device, keys), 8, mode=mode)
    dense = ops.prepare_memory(to_device(device, keys.contiguous()), 8, mode=mode)
    assert_bitwise_equal(strided, dense)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["minmax", "mean"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_prepare_memory_inplace_after_append_equals_full_prepare(device, dtype, mode, ragged):
    B, H, D, P, capacity, max_pages = 3, 2, 16, 8, 64, 10
    buf = randn(B, H, capacity, D, dtype=dtype)
    S0, S1 = 21, 43  # before and after appending 22 tokens; neither a multiple of P
    lens0 = ragged_seq_lens(B, S0) if ragged else torch.full((B,), S0, dtype=torch.int32)
    lens1 = lens0 + (S1 - S0)
    reps = 2 if mode == "minmax" else 1
    # Pages past the live ones hold garbage that must survive every call.
    summary = randn(B, H, max_pages, reps, D, dtype=dtype)
    summary[:, :, : -(-S0 // P)] = reference.prepare_memory(buf[:, :, :S0], P, mode=mode,
                                                            seq_lens=lens0)
    before = summary.clone()
    first_page = int(lens0.min()) // P  # the first page that received a new token
    summary_dev = to_device(device, summary)
    out = ops.prepare_memory_(summary_dev, to_device(device, buf[:, :, :S1]), P, first_page,
                              mode=mode, seq_lens=to_device(device, lens1))
    assert out is summary_dev
    n1 = -(-S1 // P)
    full = ops.prepare_memory(to_device(device, buf[:, :, :S1]), P, mode=mode,
                              seq_lens=to_device(device, lens1))
    after = cpu(summary_dev)
    # Same kernel code on the same tokens: bit-identical to a full prepare.
    assert_bitwise_equal(after[:, :, first_page:n1], cpu(full)[:, :, first_page:n1])
    assert_summary_matches(after[:, :, :n1],
                           reference.prepare_memory(buf[:, :, :S1], P, mode=mode, seq_lens=lens1),
                           mode, dtype)
    assert_bitwise_equal(after[:, :, :first_page], before[:, :, :first_page])
    assert_bitwise_equal(after[:, :, n1:], before[:, :, n1:])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("first_page", [5, 6, 100])
def test_prepare_memory_inplace_past_the_last_page_changes_nothing(device, first_page):
    keys = randn(1, 2, 40, 8)  # 5 pages of 8
    summary = randn(1, 2, 7, 2, 8)
    before = summary.clone()
    summary_dev = to_device(device, summary)
    ops.prepare_memory_(summary_dev, to_device(device, keys), 8, first_page)
    assert_bitwise_equal(cpu(summary_dev), before)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_prepare_memory_inplace_into_a_strided_summary(device, dtype):
    # The summary is pages 1..4 of a wider buffer: a view with a storage offset. 30 tokens of
    # 8 make 4 pages; buffer pages 0 and 5 must keep their random contents.
    keys = strided_cache(2, 3, 30, 8, dtype)
    buf = randn(2, 3, 6, 2, 8, dtype=dtype)
    before = buf.clone()
    buf_dev = to_device(device, buf)
    ops.prepare_memory_(buf_dev[:, :, 1:5], to_device(device, keys), 8, 0)
    after = cpu(buf_dev)
    assert_bitwise_equal(after[:, :, 1:5], reference.prepare_memory(keys, 8))
    assert_bitwise_equal(after[:, :, [0, 5]], before[:, :, [0, 5]])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_minmax_keeps_a_nan_key_of_any_token(device, dtype):
    # torch.amin / amax propagate NaN whichever token holds it (first, middle or last of a page);
    # the summary of that element must too, or a page with a NaN key would look ordinary.
    B, H, S, D, P = 1, 2, 24, 8, 8
    keys = randn(B, H, S, D, dtype=dtype)
    keys[0, 0, 0, 1] = float("nan")  # first token of page 0
    keys[0, 0, 11, 2] = float("nan")  # a middle token of page 1
    keys[0, 1, 23, 3] = float("nan")  # last token of page 2
    got = cpu(ops.prepare_memory(to_device(device, keys), P))
    want = reference.prepare_memory(keys, P)
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 6
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("device", devices())
def test_every_float16_value_converts_exactly(device):
    # All 65536 float16 bit patterns as keys: the CPU converts float16 with its own branch-free
    # code (cpu_common.h), which must give torch's value for each. One token per page makes the
    # min/max summary the key itself (bits kept, NaN stays NaN), and a `dot` score with query 1
    # is the key as float32 (exact; -0.0 adds up to +0.0, which == treats as equal).
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    keys = bits.view(torch.float16).view(1, 1, -1, 1)
    nan = keys.isnan()
    summary = cpu(ops.prepare_memory(to_device(device, keys), 1))
    for rep in (summary[:, :, :, 0], summary[:, :, :, 1]):
        assert torch.equal(rep.isnan(), nan)
        assert torch.equal(rep[~nan].view(torch.int16), keys[~nan].view(torch.int16))
    query = torch.ones(1, 1, 1, dtype=torch.float16)
    n = keys.shape[2]
    scores, indices = ops.topk_relevancy(to_device(device, query),
                                         to_device(device, keys.view(1, 1, n, 1, 1)), n,
                                         mode="dot")
    scores, indices = cpu(scores), cpu(indices)
    assert torch.equal(indices.view(-1), torch.arange(n, dtype=torch.int32))
    want = keys.view(-1).float()
    assert torch.equal(scores.view(-1).isnan(), want.isnan())
    assert bool((scores.view(-1)[~want.isnan()] == want[~want.isnan()]).all())
