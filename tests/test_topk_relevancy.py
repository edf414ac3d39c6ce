"""topk_relevancy against the reference, and the checker that judges its selections."""

import math

import pytest
import torch
from helpers import (
    DTYPES,
    assert_valid_topk,
    cpu,
    devices,
    dtype_id,
    poisoned_outputs,
    randn,
    score_tolerance,
    to_device,
)

from torch_memops import ops, reference

GQA_RATIOS = [1, 3, 4, 8]


def run_topk(device, query, summary, k, **kwargs):
    moved = {name: to_device(device, v) if isinstance(v, torch.Tensor) else v
             for name, v in kwargs.items()}
    with poisoned_outputs():
        scores, indices = ops.topk_relevancy(to_device(device, query), to_device(device, summary),
                                             k, **moved)
    return cpu(scores, indices)


def check_against_reference(query, summary, k, scores, indices, *, mode="bound",
                            group_reduce="max", weights=None, exact=False, **select):
    # Scores: the float32 rounding bound of score_tolerance, or none when the caller built data
    # whose scores are exact in any summation order. Selection: exact under that bound.
    ref_scores = reference.relevancy_scores(query, summary, mode=mode, group_reduce=group_reduce,
                                            weights=weights)
    tol = score_tolerance(query, summary, mode=mode, weights=weights)
    if exact:
        tol = torch.zeros_like(tol)
    assert_valid_topk(scores, indices, ref_scores, tol, k, **select)


def summary_of(B, Hkv, N, R, D, dtype):
    """A random summary; for R == 2 a real min <= max pair, as prepare_memory makes."""
    s = randn(B, Hkv, N, R, D)
    if R == 2:
        s = torch.stack([s.amin(3), s.amax(3)], dim=3)
    return s.to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["bound", "dot"])
@pytest.mark.parametrize("G", GQA_RATIOS)
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
@pytest.mark.parametrize("k", [5, 13, 20], ids=["k<N", "k=N", "k>N"])
def test_topk_matches_reference(device, dtype, mode, G, group_reduce, k):
    B, Hkv, N, D = 2, 2, 13, 24
    query = randn(B, Hkv * G, D, dtype=dtype)
    summary = summary_of(B, Hkv, N, 2, D, dtype)
    scores, indices = run_topk(device, query, summary, k, mode=mode, group_reduce=group_reduce)
    check_against_reference(query, summary, k, scores, indices, mode=mode,
                            group_reduce=group_reduce)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reps", [1, 3])
def test_dot_mode_with_other_representative_counts(device, dtype, reps):
    query, summary = randn(2, 6, 16, dtype=dtype), summary_of(2, 2, 11, reps, 16, dtype)
    scores, indices = run_topk(device, query, summary, 4, mode="dot")
    check_against_reference(query, summary, 4, scores, indices, mode="dot")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", [1, 4, 7])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_indexer_mode(device, dtype, heads, weights_dtype):
    B, N, D, k = 3, 17, 32, 6
    query = randn(B, heads, D, dtype=dtype)
    keys = summary_of(B, 1, N, 1, D, dtype)
    weights = torch.rand(B, heads).to(weights_dtype)
    scores, indices = run_topk(device, query, keys, k, mode="indexer", weights=weights)
    check_against_reference(query, keys, k, scores, indices, mode="indexer", weights=weights)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sink, recent", [(1, 0), (0, 2), (2, 3), (3, 3), (6, 0)])
def test_sink_recent_and_num_pages(device, dtype, sink, recent):
    # Rows with no valid page, one page, overlapping sink/recent windows, and all N pages.
    B, Hkv, G, N, D, k = 6, 2, 4, 20, 16, 6
    num_pages = torch.tensor([0, 1, 4, 7, 15, 20], dtype=torch.int32)
    query, summary = randn(B, Hkv * G, D, dtype=dtype), summary_of(B, Hkv, N, 2, D, dtype)
    select = dict(num_pages=num_pages, sink_pages=sink, recent_pages=recent)
    scores, indices = run_topk(device, query, summary, k, **select)
    check_against_reference(query, summary, k, scores, indices, **select)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_query_and_preallocated_summary(device, dtype):
    # The query is every other head of a wider tensor; the summary is the live pages of a
    # preallocated buffer whose spare pages hold huge values that must never be scored.
    B, Hkv, G, N, D, k = 2, 2, 3, 9, 16, 4
    query = randn(B, 2 * Hkv * G, D, dtype=dtype)[:, ::2]
    buf = torch.full((B, Hkv, N + 4, 2, D), 1e4).to(dtype)
    buf[:, :, :N] = summary_of(B, Hkv, N, 2, D, dtype)
    summary = buf[:, :, :N]
    scores, indices = run_topk(device, query, summary, k)
    check_against_reference(query, summary, k, scores, indices)


def small_integers(*shape, dtype):
    """Integers in [-4, 4]: every product and sum below is exact in float32 in any order."""
    return torch.randint(-4, 5, shape).to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["bound", "dot"])
def test_exact_ties_go_to_the_lower_page(device, dtype, mode):
    # Scores are exact (small integers), and pages repeat so that many scores tie exactly: the
    # selection must equal the reference's bit for bit.
    B, Hkv, G, D, k = 2, 2, 4, 8, 5
    distinct = small_integers(B, Hkv, 4, 2, D, dtype=dtype)
    distinct = torch.stack([distinct.amin(3), distinct.amax(3)], dim=3)
    summary = distinct[:, :, torch.randint(0, 4, (14,))]  # 14 pages, 4 distinct values
    query = small_integers(B, Hkv * G, D, dtype=dtype)
    scores, indices = run_topk(device, query, summary, k, mode=mode, sink_pages=1)
    ref_scores, ref_indices = reference.topk_relevancy(query, summary, k, mode=mode, sink_pages=1)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(scores, ref_scores)
    check_against_reference(query, summary, k, scores, indices, mode=mode, exact=True,
                            sink_pages=1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [3, 9])
def test_nan_scores_rank_lowest(device, k):
    # Pages 1, 4 and 6 score NaN; with k = 9 > 7 finite pages, NaN pages fill the rest, lowest
    # index first, and report NaN. Integer data keeps every score exact.
    B, Hkv, N, D = 1, 2, 10, 8
    summary = small_integers(B, Hkv, N, 1, D, dtype=torch.float32)
    summary[:, :, [1, 4, 6], 0, 3] = math.nan
    query = small_integers(B, 2 * Hkv, D, dtype=torch.float32)
    scores, indices = run_topk(device, query, summary, k, mode="dot")
    ref_scores, ref_indices = reference.topk_relevancy(query, summary, k, mode="dot")
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0, equal_nan=True)
    taken = indices[indices >= 0]
    nan_taken = sorted(set(taken.tolist()) & {1, 4, 6})
    assert nan_taken == ([] if k == 3 else [1, 4])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_indexer_propagates_nan(device, dtype):
    # relu(NaN) is NaN, as in torch.relu: a NaN index key makes its page's score NaN (ranked
    # lowest, like any NaN score), and a NaN index head makes every score of its row NaN; neither
    # may turn into 0 and rank as an ordinary page.
    B, Hi, N, D = 2, 4, 12, 16
    query = small_integers(B, Hi, D, dtype=dtype)
    keys = small_integers(B, 1, N, 1, D, dtype=dtype)
    weights = torch.randint(1, 4, (B, Hi)).float()
    keys[0, 0, 3, 0, 5] = math.nan
    query[1, 2, 0] = math.nan
    for k in (5, N):
        scores, indices = run_topk(device, query, keys, k, mode="indexer", weights=weights)
        ref_scores, ref_indices = reference.topk_relevancy(query, keys, k, mode="indexer",
                                                           weights=weights)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0, equal_nan=True)
    # k = N: every page is selected in ascending order, so scores[b, 0, n] is page n's score.
    assert torch.isnan(scores[0, 0, 3]) and not scores[0, 0, :3].isnan().any()
    assert torch.isnan(scores[1]).all()


def test_checker_accepts_the_reference_selection():
    query, summary = randn(2, 8, 16), summary_of(2, 2, 12, 2, 16, torch.float32)
    ref_scores, ref_indices = reference.topk_relevancy(query, summary, 5, sink_pages=1)
    check_against_reference(query, summary, 5, ref_scores, ref_indices, sink_pages=1)


def corrupt_swap_for_worse_page(scores, indices, all_scores):
    """Replaces the best taken page of row (0, 0) by the worst page left out."""
    taken = indices[0, 0].tolist()
    left_out = [p for p in range(all_scores.shape[-1]) if p not in taken]
    worst = min(left_out, key=lambda p: float(all_scores[0, 0, p]))
    best = max(taken, key=lambda p: float(all_scores[0, 0, p]))
    new_row = sorted([p for p in taken if p != best] + [worst])
    indices[0, 0] = torch.tensor(new_row, dtype=torch.int32)
    scores[0, 0] = all_scores[0, 0, new_row]


def corrupt_unsorted(scores, indices, all_scores):
    indices[0, 0] = indices[0, 0].flip(0)
    scores[0, 0] = scores[0, 0].flip(0)


def corrupt_score(scores, indices, all_scores):
    scores[0, 0, 0] += 1.0


def corrupt_padding(scores, indices, all_scores):
    indices[0, 0, -1] = -1
    scores[0, 0, -1] = -math.inf


def corrupt_forced_page(scores, indices, all_scores):
    taken = indices[0, 0].tolist()
    left_out = [p for p in range(all_scores.shape[-1]) if p not in taken]
    new_row = sorted(taken[1:] + [left_out[0]])  # drops sink page 0
    indices[0, 0] = torch.tensor(new_row, dtype=torch.int32)
    scores[0, 0] = all_scores[0, 0, new_row]


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_swap_for_worse_page, corrupt_unsorted, corrupt_score, corrupt_padding,
     corrupt_forced_page],
)
def test_checker_rejects_a_wrong_selection(corrupt):
    # The tolerance of check_against_reference must not hide a wrong answer.
    query, summary = randn(1, 4, 16), summary_of(1, 1, 12, 2, 16, torch.float32)
    all_scores = reference.relevancy_scores(query, summary)
    scores, indices = reference.topk_relevancy(query, summary, 5, sink_pages=1)
    corrupt(scores, indices, all_scores)
    with pytest.raises(AssertionError):
        check_against_reference(query, summary, 5, scores, indices, sink_pages=1)


def test_checker_rejects_breaking_an_exact_tie_upwards():
    # Pages 2 and 5 tie exactly (identical summaries, exact integer scores); taking 5 is wrong.
    # Every other page gets a distinct multiple of the query, so no third page can join the tie
    # (random summaries sometimes tied a lower page with page 2 and the checker named that one).
    query = small_integers(1, 1, 8, dtype=torch.float32)
    query[..., 0] = 1  # never the zero vector: scores are multiple * |query|^2
    # Seven distinct nonzero integers: a zero summary has a zero tolerance, which would make even
    # the tolerant check insist on the tie order.
    nonzero = torch.tensor([-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0])
    multiples = nonzero[torch.randperm(8)[:7]]
    multiples = torch.cat([multiples[:5], multiples[2:3], multiples[5:7]])  # page 5 = page 2
    summary = (multiples.view(8, 1) * query.view(1, 8)).view(1, 1, 8, 1, 8)
    all_scores = reference.relevancy_scores(query, summary, mode="dot")
    others = [p for p in range(8) if p not in (2, 5)]
    above = [p for p in others if all_scores[0, 0, p] > all_scores[0, 0, 2]]
    taken = sorted(above + [5])
    k = len(taken)
    indices = torch.tensor(taken, dtype=torch.int32).view(1, 1, k)
    scores = all_scores[:, :, taken]
    check_against_reference(query, summary, k, scores, indices, mode="dot")  # within tolerance
    with pytest.raises(AssertionError, match="page 2"):
        check_against_reference(query, summary, k, scores, indices, mode="dot", exact=True)
