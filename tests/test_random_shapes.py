"""Every op against the reference on shapes that no other test names.

A fixed number of cases per run, each with random sizes (drawn from the per-test seed, so they
change from run to run and replay with MEMOPS_TEST_SEED), random dtype, GQA ratio, page size,
seq_lens, k and selection options, on strided views of larger buffers.
"""

import pytest
import torch
from helpers import (
    DTYPES,
    ROUNDED_TOL,
    assert_bitwise_equal,
    assert_valid_topk,
    cpu,
    devices,
    poisoned_outputs,
    score_tolerance,
    strided_cache,
    to_device,
)

from torch_memops import ops, reference

CASES = 12


def draw(low, high):
    return int(torch.randint(low, high + 1, ()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(CASES))
def test_pipeline_on_random_shapes(device, case):
    dtype = DTYPES[draw(0, 2)]
    B, Hkv, G, D = draw(1, 3), draw(1, 3), [1, 2, 3, 4, 5, 8][draw(0, 5)], draw(1, 40)
    P, S = draw(1, 20), draw(1, 90)
    N = -(-S // P)
    k = draw(1, N + 3)
    sink = draw(0, min(2, k))
    recent = draw(0, k - sink)
    seq_lens = torch.randint(0, S + 1, (B,), dtype=torch.int32) if draw(0, 1) else None
    mode = ["minmax", "mean"][draw(0, 1)]
    relevancy = "bound" if mode == "minmax" and draw(0, 1) else "dot"
    group_reduce = ["max", "sum"][draw(0, 1)]
    setup = dict(dtype=dtype, B=B, Hkv=Hkv, G=G, D=D, P=P, S=S, k=k, sink=sink, recent=recent,
                 seq_lens=seq_lens, mode=mode, relevancy=relevancy, group_reduce=group_reduce)

    keys = strided_cache(B, Hkv, S, D, dtype)
    values = strided_cache(B, Hkv, S, D, dtype)
    query = torch.randn(B, Hkv * G, D).to(dtype)
    dev = lambda t: to_device(device, t)  # noqa: E731
    lens_dev = dev(seq_lens)

    with poisoned_outputs():
        summary = cpu(ops.prepare_memory(dev(keys), P, mode=mode, seq_lens=lens_dev))
    ref_summary = reference.prepare_memory(keys, P, mode=mode, seq_lens=seq_lens)
    if mode == "minmax":
        assert_bitwise_equal(summary, ref_summary)
    else:
        # Float32 mean of <= 20 values in another order, rounded once to dtype (see
        # test_prepare_memory.mean_tolerance).
        torch.testing.assert_close(summary, ref_summary,
                                   **{**ROUNDED_TOL[dtype], "atol": 1e-5}, msg=str(setup))

    num_pages = None
    if seq_lens is not None:
        num_pages = ((seq_lens + P - 1) // P).to(torch.int32)
    select = dict(num_pages=num_pages, sink_pages=sink, recent_pages=recent)
    with poisoned_outputs():
        scores, indices = cpu(*ops.topk_relevancy(
            dev(query), dev(summary), k, mode=relevancy, group_reduce=group_reduce,
            num_pages=dev(num_pages), sink_pages=sink, recent_pages=recent))
    ref_scores = reference.relevancy_scores(query, summary, mode=relevancy,
                                            group_reduce=group_reduce)
    tol = score_tolerance(query, summary, mode=relevancy)
    assert_valid_topk(scores, indices, ref_scores, tol, k, **select)

    with poisoned_outputs():
        gathered, lengths = cpu(*ops.gather_retrieve(dev(values), dev(indices), P,
                                                     seq_lens=lens_dev))
    ref_gathered, ref_lengths = reference.gather_retrieve(values, indices, P, seq_lens=seq_lens)
    assert_bitwise_equal(gathered, ref_gathered)
    assert torch.equal(lengths, ref_lengths)

    with poisoned_outputs():
        out, lse = cpu(*ops.sparse_apply(dev(query), dev(keys), dev(values), dev(indices), P,
                                         seq_lens=lens_dev))
    ref_out, ref_lse = reference.sparse_apply(query, keys, values, indices, P, seq_lens=seq_lens)
    # Float32 accumulation rounded once to dtype (helpers.ROUNDED_TOL); lse: a few float32 ulps.
    torch.testing.assert_close(out, ref_out, **ROUNDED_TOL[dtype], msg=str(setup))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5, msg=str(setup))
