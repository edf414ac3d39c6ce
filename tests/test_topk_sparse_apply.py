"""topk_sparse_apply (Relevancy + top-k + Apply in one op; one kernel launch on CUDA) against the
reference, and against topk_relevancy and sparse_apply run one after the other on the same device.

On every device: the selection is an exact top-k under the reference scores and equal, bit for
bit, to topk_relevancy's on that device (the one-launch kernel scores and selects with the same
code); the attention equals the reference's over the pages selected. On CUDA also, with the
one-launch kernel switched on (MEMOPS_CUDA_FUSED_STEP=1): it is what ran (profiled), it matches
the default two-op path within the float32 summation order, a CUDA graph replays it, and the
shapes it does not take fall back to the two ops.
"""

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

# One rounding of the output to the dtype plus float32 accumulation in another order.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (B, Hq, Hkv, S, D, P, k): GQA 4:1 and 7:1, MHA, k > N, one token a page, a partial last page.
SHAPES = [(1, 8, 2, 300, 64, 16, 5), (2, 4, 4, 37, 16, 8, 9), (3, 14, 2, 200, 32, 16, 4),
          (2, 6, 6, 45, 8, 1, 7)]
# mode, summary mode
SCORINGS = [("bound", "minmax"), ("dot", "mean"), ("dot", "minmax")]

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("memops::topk_sparse_apply", "CUDA"),
    reason="needs a CUDA device and torch_memops' CUDA kernels")


def make_step(shape, dtype, summary_mode, ragged, *, seed=0):
    """CPU inputs of one decode step: strided caches, ragged lengths and page counts."""
    torch.manual_seed(seed)
    B, Hq, Hkv, S, D, P, k = shape
    keys, values = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    query = randn(B, Hq, D, dtype=dtype)
    seq_lens = ragged_seq_lens(B, S) if ragged else None
    num_pages = None if seq_lens is None else ((seq_lens + P - 1) // P).to(torch.int32)
    summary = ops.prepare_memory(keys, P, mode=summary_mode, seq_lens=seq_lens)  # tested elsewhere
    return dict(query=query, summary=summary, keys=keys, values=values, seq_lens=seq_lens,
                num_pages=num_pages, k=k, page_size=P)


def run_step(device, inputs, **kwargs):
    q, s, kc, vc, lens, pages = to_device(device, inputs["query"], inputs["summary"], inputs["keys"],
                                          inputs["values"], inputs["seq_lens"], inputs["num_pages"])
    with poisoned_outputs():
        got = ops.topk_sparse_apply(q, s, kc, vc, inputs["k"], inputs["page_size"], num_pages=pages,
                                    seq_lens=lens, **kwargs)
    # The same selection by topk_relevancy on this device.
    kw = {n: kwargs[n] for n in ("mode", "sink_pages", "recent_pages", "group_reduce") if n in kwargs}
    two_op = ops.topk_relevancy(q, s, inputs["k"], num_pages=pages, **kw)
    return ops.TopkApplyResult(*cpu(*got)), cpu(*two_op)


def assert_step_correct(inputs, got, two_op, *, mode, group_reduce="max", sink_pages=0,
                        recent_pages=0, scale=None):
    query, summary, dtype = inputs["query"], inputs["summary"], inputs["query"].dtype
    out, lse, scores, indices = got
    ref_scores = reference.relevancy_scores(query, summary, mode=mode, group_reduce=group_reduce)
    assert_valid_topk(scores, indices, ref_scores, score_tolerance(query, summary, mode=mode),
                      inputs["k"], num_pages=inputs["num_pages"], sink_pages=sink_pages,
                      recent_pages=recent_pages)
    assert_bitwise_equal(indices, two_op[1])
    assert_bitwise_equal(scores, two_op[0])
    want_out, want_lse = reference.sparse_apply(query, inputs["keys"], inputs["values"], indices,
                                                inputs["page_size"], seq_lens=inputs["seq_lens"],
                                                scale=scale)
    assert out.dtype == dtype and out.shape == want_out.shape
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scoring", SCORINGS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_matches_reference_and_the_two_ops(device, dtype, shape, scoring, ragged):
    mode, summary_mode = scoring
    inputs = make_step(shape, dtype, summary_mode, ragged)
    kwargs = dict(mode=mode, sink_pages=1, recent_pages=1)
    got, two_op = run_step(device, inputs, **kwargs)
    assert_step_correct(inputs, got, two_op, **kwargs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("options", [dict(group_reduce="sum"), dict(scale=0.3),
                                     dict(sink_pages=2, recent_pages=3), dict()], ids=str)
def test_options_reach_both_steps(device, options):
    inputs = make_step((2, 8, 2, 250, 64, 16, 6), torch.bfloat16, "minmax", ragged=True, seed=1)
    got, two_op = run_step(device, inputs, mode="bound", **options)
    assert_step_correct(inputs, got, two_op, mode="bound", **options)


@pytest.mark.parametrize("device", devices())
def test_int8_summary_runs_the_two_ops(device):
    inputs = make_step((2, 8, 2, 160, 64, 16, 4), torch.float16, "minmax", ragged=True, seed=2)
    q, kc, vc, lens, pages = to_device(device, inputs["query"], inputs["keys"], inputs["values"],
                                       inputs["seq_lens"], inputs["num_pages"])
    q8 = ops.prepare_memory(kc, 16, mode="minmax_int8", seq_lens=lens)
    got = ops.topk_sparse_apply(q, q8, kc, vc, 4, 16, num_pages=pages, seq_lens=lens, recent_pages=1)
    scores, indices = ops.topk_relevancy(q, q8, 4, num_pages=pages, recent_pages=1)
    assert_bitwise_equal(got.indices.cpu(), indices.cpu())
    assert_bitwise_equal(got.scores.cpu(), scores.cpu())
    want_out, want_lse = ops.sparse_apply(q, kc, vc, indices, 16, seq_lens=lens)
    assert_bitwise_equal(got.out.cpu(), want_out.cpu())
    assert_bitwise_equal(got.lse.cpu(), want_lse.cpu())


def test_compiles_with_fullgraph_and_gives_the_eager_result():
    inputs = make_step((2, 8, 2, 300, 64, 16, 5), torch.float32, "minmax", ragged=True, seed=3)
    args = (inputs["summary"], inputs["keys"], inputs["values"], 5, 16)
    kw = dict(num_pages=inputs["num_pages"], seq_lens=inputs["seq_lens"], recent_pages=1)

    def step(query):
        return ops.topk_sparse_apply(query, *args, **kw)

    eager = step(inputs["query"])
    compiled = torch.compile(step, fullgraph=True)(inputs["query"])
    for a, b in zip(compiled, eager):
        assert_bitwise_equal(a, b)


# ---- CUDA: the one-launch kernel --------------------------------------------------------------

# (B, Hq, Hkv, S, D, P, k): Llama-3-8B heads at batch 1; many rows (more items than resident
# blocks); 8192 pages a row (the longest the kernel takes); k > N; D 64 with groups of 7 and 1.
CUDA_SHAPES = [(1, 32, 8, 32768, 128, 16, 128), (16, 32, 8, 640, 128, 16, 8),
               (1, 8, 2, 131072, 128, 16, 256), (3, 8, 2, 100, 128, 16, 12),
               (2, 28, 4, 4000, 64, 16, 32), (4, 4, 4, 2000, 64, 16, 20)]


def profiled_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("scoring", SCORINGS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_cuda_one_launch(dtype, shape, scoring, monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_STEP", "1")
    mode, summary_mode = scoring
    inputs = make_step(shape, dtype, summary_mode, ragged=shape[0] > 1, seed=4)
    kwargs = dict(mode=mode, sink_pages=1, recent_pages=2)
    got, two_op = run_step("cuda", inputs, **kwargs)
    if shape[3] <= 4000:  # the float64-free reference loops are slow beyond that
        assert_step_correct(inputs, got, two_op, **kwargs)
    else:
        assert_bitwise_equal(got.indices, two_op[1])
        assert_bitwise_equal(got.scores, two_op[0])
    # The two-op path on the same device: the same selection, the output within rounding.
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_STEP", "0")
    unfused, _ = run_step("cuda", inputs, **kwargs)
    assert_bitwise_equal(got.indices, unfused.indices)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(got.out.float(), unfused.out.float(), rtol=tol, atol=tol)
    finite = torch.isfinite(unfused.lse)
    torch.testing.assert_close(got.lse[finite], unfused.lse[finite], rtol=1e-5, atol=1e-5)
    assert_bitwise_equal(torch.isfinite(got.lse), finite)


@CUDA
def test_cuda_runs_one_kernel_and_replays_in_a_graph(monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_STEP", "1")
    inputs = make_step((1, 32, 8, 32768, 128, 16, 128), torch.bfloat16, "minmax", ragged=False, seed=5)
    q, s, kc, vc = to_device("cuda", inputs["query"], inputs["summary"], inputs["keys"], inputs["values"])

    def step():
        return ops.topk_sparse_apply(q, s, kc, vc, 128, 16, recent_pages=2)

    names = profiled_kernels(step)
    launched = [n for n in names if "topk_sparse_apply_tc_kernel" in n]
    assert len(launched) == 1, names
    others = [n for n in names if n not in launched and "fill" not in n.lower() and "memset" not in n.lower()]
    assert not others, f"kernels beside the one-launch step (and its counter fill): {others}"

    eager = step()
    step()  # warm-up on the side stream of the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for trial in range(3):
        q.copy_(randn(*q.shape, dtype=q.dtype).to("cuda"))
        graph.replay()
        want = step()
        assert_bitwise_equal(captured.indices, want.indices)
        torch.testing.assert_close(captured.out.float(), want.out.float(), rtol=0, atol=0)
    assert not torch.equal(captured.indices, eager.indices)  # the replays saw the new queries


@CUDA
@pytest.mark.parametrize("case", ["float32", "head-dim-96", "group-16", "pages-over-8192"])
def test_cuda_shapes_it_does_not_take_run_the_two_ops(case, monkeypatch):
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_STEP", "1")
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    B, Hq, Hkv, S, D, P, k = 1, 8, 2, 600, 64, 16, 6
    if case == "head-dim-96":
        D = 96
    if case == "group-16":
        Hq = 32
    if case == "pages-over-8192":
        S = 8193 * P
    inputs = make_step((B, Hq, Hkv, S, D, P, k), dtype, "minmax", ragged=False, seed=6)
    got, two_op = run_step("cuda", inputs, mode="bound", recent_pages=1)
    assert_bitwise_equal(got.indices, two_op[1])
    q, kc, vc = to_device("cuda", inputs["query"], inputs["keys"], inputs["values"])
    out, lse = ops.sparse_apply(q, kc, vc, two_op[1].cuda(), P)
    assert_bitwise_equal(got.out, out.cpu())
    assert not any("topk_sparse_apply_tc_kernel" in n for n in profiled_kernels(
        lambda: ops.topk_sparse_apply(q, to_device("cuda", inputs["summary"]), kc, vc, k, P)))


@CUDA
def test_cuda_empty_rows_and_no_valid_page(monkeypatch):
    """A row with seq_lens 0 and num_pages 0: indices all -1, out 0, lse -inf."""
    monkeypatch.setenv("MEMOPS_CUDA_FUSED_STEP", "1")
    inputs = make_step((3, 8, 2, 500, 128, 16, 8), torch.bfloat16, "minmax", ragged=True, seed=7)
    got, two_op = run_step("cuda", inputs, mode="bound")
    assert int(inputs["seq_lens"][0]) == 0
    assert bool((got.indices[0] == -1).all())
    assert bool((got.out[0] == 0).all()) and bool((got.lse[0] == -math.inf).all())
    assert_step_correct(inputs, got, two_op, mode="bound")


@CUDA
def test_cuda_runs_the_two_ops_by_default(monkeypatch):
    monkeypatch.delenv("MEMOPS_CUDA_FUSED_STEP", raising=False)
    inputs = make_step((1, 32, 8, 4096, 128, 16, 32), torch.bfloat16, "minmax", ragged=False, seed=8)
    q, s, kc, vc = to_device("cuda", inputs["query"], inputs["summary"], inputs["keys"], inputs["values"])
    names = profiled_kernels(lambda: ops.topk_sparse_apply(q, s, kc, vc, 32, 16, recent_pages=1))
    assert not any("topk_sparse_apply_tc_kernel" in n for n in names), names
    assert any("relevancy_tc_kernel" in n for n in names) and any("sparse_apply_tc_kernel" in n for n in names)
