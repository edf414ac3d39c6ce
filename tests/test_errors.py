"""Bad arguments raise an error that names the argument, and nothing passed in is modified."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_bitwise_equal, devices, randn, to_device, value_checking_devices

import torch_memops
from torch_memops import ops

B, HKV, G, S, D, P, K = 2, 2, 4, 21, 8, 8, 2
N = -(-S // P)


def valid_inputs(device):
    """One valid set of arguments for every op, on `device`."""
    keys = randn(B, HKV, S, D)
    values = {
        "keys": keys,
        "values": randn(B, HKV, S, D),
        "query": randn(B, HKV * G, D),
        "summary": torch.stack([keys[:, :, :N], keys[:, :, N:2 * N]], dim=3),
        "mean_summary": randn(B, HKV, N, 1, D),
        "index_keys": randn(B, 1, N, 1, D),
        "weights": torch.rand(B, HKV * G),
        "indices": torch.tensor([[[0, 2]] * HKV] * B, dtype=torch.int32),
        "seq_lens": torch.tensor([S, 3], dtype=torch.int32),
        "num_pages": torch.tensor([N, 1], dtype=torch.int32),
        "out": randn(B, HKV * G, D),
        "lse": randn(B, HKV * G),
    }
    return SimpleNamespace(**{name: to_device(device, t) for name, t in values.items()})


def prepare(v, keys=None, page_size=P, **kw):
    return ops.prepare_memory, (v.keys if keys is None else keys, page_size), kw


def prepare_inplace(v, summary=None, keys=None, page_size=P, first_page=0, **kw):
    summary = v.summary if summary is None else summary
    return ops.prepare_memory_, (summary, v.keys if keys is None else keys, page_size,
                                 first_page), kw


def topk(v, query=None, summary=None, k=K, **kw):
    return ops.topk_relevancy, (v.query if query is None else query,
                                v.summary if summary is None else summary, k), kw


def gather(v, memory=None, indices=None, page_size=P, **kw):
    return ops.gather_retrieve, (v.keys if memory is None else memory,
                                 v.indices if indices is None else indices, page_size), kw


def apply(v, query=None, k_cache=None, v_cache=None, indices="valid", page_size=P, **kw):
    return ops.sparse_apply, (v.query if query is None else query,
                              v.keys if k_cache is None else k_cache,
                              v.values if v_cache is None else v_cache,
                              v.indices if indices == "valid" else indices, page_size), kw


def step(v, query=None, summary=None, k_cache=None, v_cache=None, k=K, page_size=P, **kw):
    return ops.topk_sparse_apply, (v.query if query is None else query,
                                   v.summary if summary is None else summary,
                                   v.keys if k_cache is None else k_cache,
                                   v.values if v_cache is None else v_cache, k, page_size), kw


def merge(v, out_a=None, lse_a=None, out_b=None, lse_b=None):
    return ops.merge_attention, (v.out if out_a is None else out_a,
                                 v.lse if lse_a is None else lse_a,
                                 v.out.clone() if out_b is None else out_b,
                                 v.lse.clone() if lse_b is None else lse_b), {}


def i64(t):
    return t.to(torch.int64)


# (id, builder of the bad call from valid inputs, regex naming the argument)
SHAPE_AND_TYPE_CASES = [
    ("prepare/keys-rank", lambda v: prepare(v, keys=v.keys[0]), "`keys`"),
    ("prepare/keys-dtype", lambda v: prepare(v, keys=v.keys.to(torch.int32)), "`keys`"),
    ("prepare/keys-float64", lambda v: prepare(v, keys=v.keys.double()), "`keys`"),
    ("prepare/keys-last-dim", lambda v: prepare(v, keys=v.keys.transpose(2, 3)), "`keys`"),
    ("prepare/page_size-0", lambda v: prepare(v, page_size=0), "`page_size`"),
    ("prepare/page_size-neg", lambda v: prepare(v, page_size=-8), "`page_size`"),
    ("prepare/mode", lambda v: prepare(v, mode="median"), "`mode`"),
    ("prepare/seq_lens-dtype", lambda v: prepare(v, seq_lens=i64(v.seq_lens)), "`seq_lens`"),
    ("prepare/seq_lens-shape", lambda v: prepare(v, seq_lens=v.seq_lens[:1]), "`seq_lens`"),
    ("prepare_/summary-rank", lambda v: prepare_inplace(v, summary=v.summary[0]), "`summary`"),
    ("prepare_/summary-dtype", lambda v: prepare_inplace(v, summary=v.summary.half()),
     "`summary`"),
    ("prepare_/summary-pages", lambda v: prepare_inplace(v, summary=v.summary[:, :, :N - 1]),
     "`summary`"),
    ("prepare_/summary-overlap",
     lambda v: prepare_inplace(v, summary=v.summary[:, :1].expand(B, HKV, N, 2, D)), "`summary`"),
    ("prepare_/mode-R", lambda v: prepare_inplace(v, mode="mean"), "`summary`"),
    ("prepare_/mode-R-mean", lambda v: prepare_inplace(v, summary=v.mean_summary), "`summary`"),
    ("prepare_/keys-rank", lambda v: prepare_inplace(v, keys=v.keys[0]), "`keys`"),
    ("prepare_/page_size", lambda v: prepare_inplace(v, page_size=0), "`page_size`"),
    ("prepare_/first_page", lambda v: prepare_inplace(v, first_page=-1), "`first_page`"),
    ("prepare_/seq_lens-dtype", lambda v: prepare_inplace(v, seq_lens=i64(v.seq_lens)),
     "`seq_lens`"),
    ("topk/query-rank", lambda v: topk(v, query=v.query[0]), "`query`"),
    ("topk/summary-rank", lambda v: topk(v, summary=v.summary[0]), "`summary`"),
    ("topk/query-dtype", lambda v: topk(v, query=v.query.to(torch.int32)), "`query`"),
    ("topk/dtype-mix", lambda v: topk(v, query=v.query.half()), "`summary`"),
    ("topk/head-dim", lambda v: topk(v, query=v.query[..., :D - 1]), "head dim D"),
    ("topk/gqa", lambda v: topk(v, query=v.query[:, :HKV * G - 1]), "Hq must be a multiple"),
    ("topk/k-0", lambda v: topk(v, k=0), "`k`"),
    ("topk/k-neg", lambda v: topk(v, k=-3), "`k`"),
    ("topk/mode", lambda v: topk(v, mode="cosine"), "`mode`"),
    ("topk/bound-R", lambda v: topk(v, summary=v.mean_summary), "`summary`"),
    ("topk/indexer-shape", lambda v: topk(v, mode="indexer", weights=v.weights), "`summary`"),
    ("topk/indexer-no-weights", lambda v: topk(v, summary=v.index_keys, mode="indexer"),
     "`weights`"),
    ("topk/weights-not-indexer", lambda v: topk(v, weights=v.weights), "`weights`"),
    ("topk/weights-shape", lambda v: topk(v, summary=v.index_keys, mode="indexer",
                                          weights=v.weights[:, 1:]), "`weights`"),
    ("topk/weights-dtype", lambda v: topk(v, summary=v.index_keys, mode="indexer",
                                          weights=v.weights.to(torch.int32)), "`weights`"),
    ("topk/group_reduce", lambda v: topk(v, group_reduce="mean"), "`group_reduce`"),
    ("topk/sink-neg", lambda v: topk(v, sink_pages=-1), "`sink_pages`"),
    ("topk/forced-over-k", lambda v: topk(v, sink_pages=1, recent_pages=2), "`sink_pages"),
    ("topk/num_pages-dtype", lambda v: topk(v, num_pages=i64(v.num_pages)), "`num_pages`"),
    ("gather/memory-rank", lambda v: gather(v, memory=v.keys[0]), "`memory`"),
    ("gather/indices-dtype", lambda v: gather(v, indices=i64(v.indices)), "`indices`"),
    ("gather/indices-rank", lambda v: gather(v, indices=v.indices[0]), "`indices`"),
    ("gather/indices-heads", lambda v: gather(v, indices=v.indices[:, :1]), "`indices`"),
    ("gather/page_size", lambda v: gather(v, page_size=0), "`page_size`"),
    ("gather/seq_lens-dtype", lambda v: gather(v, seq_lens=i64(v.seq_lens)), "`seq_lens`"),
    ("apply/query-rank", lambda v: apply(v, query=v.query[0]), "`query`"),
    ("apply/k_cache-rank", lambda v: apply(v, k_cache=v.keys[0]), "`k_cache`"),
    ("apply/query-dtype", lambda v: apply(v, query=v.query.to(torch.int32)), "`query`"),
    ("apply/dtype-mix", lambda v: apply(v, v_cache=v.values.half()), "`v_cache`"),
    ("apply/kv-shape", lambda v: apply(v, v_cache=v.values[:, :, :S - 1]), "`v_cache`"),
    ("apply/gqa", lambda v: apply(v, query=v.query[:, :HKV * G - 1]), "Hq must be a multiple"),
    ("apply/page_size", lambda v: apply(v, page_size=0), "`page_size`"),
    ("apply/indices-dtype", lambda v: apply(v, indices=i64(v.indices)), "`indices`"),
    ("apply/indices-heads", lambda v: apply(v, indices=v.indices[:, :1]), "`indices`"),
    ("apply/seq_lens-shape", lambda v: apply(v, seq_lens=v.seq_lens[:1]), "`seq_lens`"),
    ("merge/out_b-shape", lambda v: merge(v, out_b=v.out[:, :1]), "`out_b`"),
    ("merge/out_b-dtype", lambda v: merge(v, out_b=v.out.half()), "`out_b`"),
    ("merge/out_a-dtype", lambda v: merge(v, out_a=v.out.to(torch.int32)), "`out_a`"),
    ("merge/lse_a-dtype", lambda v: merge(v, lse_a=v.lse.half()), "`lse_a`"),
    ("merge/lse_b-shape", lambda v: merge(v, lse_b=v.lse[:, :1]), "`lse_b`"),
    # Bounds: token and page counts are int32 in the kernels.
    ("prepare/page_size-huge", lambda v: prepare(v, page_size=2**63 - 1), "`page_size`"),
    ("prepare_/page_size-huge", lambda v: prepare_inplace(v, page_size=2**31), "`page_size`"),
    ("topk/k-huge", lambda v: topk(v, k=2**40), "`k` must be <= 2\\^31 - 1"),
    ("gather/page_size-huge", lambda v: gather(v, page_size=2**40), "`page_size`"),
    ("gather/tokens-huge", lambda v: gather(v, page_size=2**30), "`indices` selects k \\* page"),
    ("apply/page_size-huge", lambda v: apply(v, page_size=2**40), "`page_size`"),
    ("apply/tokens-huge", lambda v: apply(v, page_size=2**30), "`indices` selects k \\* page"),
    # The softmax scale must be a finite number > 0 (docs/design.md, Decisions).
    ("apply/scale-nan", lambda v: apply(v, scale=math.nan), "`scale`"),
    ("apply/scale-inf", lambda v: apply(v, scale=math.inf), "`scale`"),
    ("apply/scale-neg-inf", lambda v: apply(v, scale=-math.inf), "`scale`"),
    ("apply/scale-0", lambda v: apply(v, scale=0.0), "`scale`"),
    ("apply/scale-neg", lambda v: apply(v, scale=-0.125), "`scale`"),
    # topk_sparse_apply: both ops' checks, named for it, and the summary must fit the cache.
    ("step/mode-indexer", lambda v: step(v, summary=v.index_keys, mode="indexer"), "`mode`"),
    ("step/summary-batch", lambda v: step(v, summary=v.summary[:1]), "`summary`"),
    ("step/summary-heads", lambda v: step(v, summary=v.summary[:, :1],
                                          query=v.query[:, :G]), "`summary`"),
    ("step/summary-pages", lambda v: step(v, k_cache=v.keys[:, :, :P], v_cache=v.values[:, :, :P]),
     "`summary` has N"),
    ("step/v_cache-shape", lambda v: step(v, v_cache=v.values[:, :, :S - 1]), "`v_cache`"),
    ("step/k-huge", lambda v: step(v, k=2**40), "`k`"),
    ("step/tokens-huge", lambda v: step(v, k=2**20, page_size=2**12), "`k` \\* `page_size`"),
    ("step/scale-nan", lambda v: step(v, scale=math.nan), "`scale`"),
    # Only the last dim must be contiguous, in every op.
    ("merge/out_a-last-dim", lambda v: merge(v, out_a=torch.stack([v.out, v.out], -1)[..., 0]),
     "the last dim of `out_a`"),
    ("merge/out_b-last-dim", lambda v: merge(v, out_b=torch.stack([v.out, v.out], -1)[..., 1]),
     "the last dim of `out_b`"),
]

VALUE_CASES = [
    ("prepare/seq_lens-over", lambda v: prepare(v, seq_lens=v.seq_lens + S), "`seq_lens"),
    ("prepare/seq_lens-neg", lambda v: prepare(v, seq_lens=v.seq_lens - 4), "`seq_lens"),
    ("prepare_/seq_lens-over", lambda v: prepare_inplace(v, seq_lens=v.seq_lens + 1),
     "`seq_lens"),
    ("topk/num_pages-over", lambda v: topk(v, num_pages=v.num_pages + 1), "`num_pages"),
    ("topk/num_pages-neg", lambda v: topk(v, num_pages=v.num_pages - 2), "`num_pages"),
    ("gather/index-over", lambda v: gather(v, indices=v.indices + N - 2), "`indices`"),
    ("gather/index-neg", lambda v: gather(v, indices=v.indices - 2), "`indices`"),
    ("gather/seq_lens-over", lambda v: gather(v, seq_lens=v.seq_lens + 1), "`seq_lens"),
    ("apply/index-over", lambda v: apply(v, indices=v.indices + N - 2), "`indices`"),
    ("apply/seq_lens-over", lambda v: apply(v, seq_lens=v.seq_lens + S), "`seq_lens"),
    ("step/num_pages-over", lambda v: step(v, num_pages=v.num_pages + 1), "`num_pages"),
    ("step/seq_lens-over", lambda v: step(v, seq_lens=v.seq_lens + S), "`seq_lens"),
]


def other_devices(device):
    """Devices to mix with `device`: meta always, and every other device with kernels."""
    return ["meta"] + [d for d in devices() if d != device]


# (id, builder taking inputs on the test device and one tensor moved to `other`, regex)
DEVICE_MIX_CASES = [
    ("prepare/seq_lens", lambda v, o: prepare(v, seq_lens=v.seq_lens.to(o)), "`seq_lens`"),
    ("prepare_/summary", lambda v, o: prepare_inplace(v, keys=v.keys.to(o)), "`summary`"),
    ("topk/summary", lambda v, o: topk(v, summary=v.summary.to(o)), "`summary`"),
    ("topk/num_pages", lambda v, o: topk(v, num_pages=v.num_pages.to(o)), "`num_pages`"),
    ("topk/weights", lambda v, o: topk(v, summary=v.index_keys, mode="indexer",
                                       weights=v.weights.to(o)), "`weights`"),
    ("gather/indices", lambda v, o: gather(v, indices=v.indices.to(o)), "`indices`"),
    ("apply/k_cache", lambda v, o: apply(v, k_cache=v.keys.to(o)), "`k_cache`"),
    ("apply/indices", lambda v, o: apply(v, indices=v.indices.to(o)), "`indices`"),
    ("merge/lse_b", lambda v, o: merge(v, lse_b=v.lse.to(o)), "`lse_b`"),
    ("step/v_cache", lambda v, o: step(v, v_cache=v.values.to(o)), "`v_cache`"),
    ("step/seq_lens", lambda v, o: step(v, seq_lens=v.seq_lens.to(o)), "`seq_lens`"),
]


def assert_raises_and_leaves_inputs_alone(fn, args, kwargs, match):
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in tensors]
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(*args, **kwargs)
    for t, saved in zip(tensors, before):
        if t.device.type != "meta":
            assert_bitwise_equal(t, saved)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", SHAPE_AND_TYPE_CASES, ids=[c[0] for c in SHAPE_AND_TYPE_CASES])
def test_bad_shape_or_type_raises(device, case):
    _, build, match = case
    assert_raises_and_leaves_inputs_alone(*build(valid_inputs(device)), match)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_bad_value_raises(device, case):
    """Host backends always; device backends (which apply the out-of-range rule instead, with
    no host sync: docs/design.md) in checked mode."""
    _, build, match = case
    previous = torch_memops.value_checks()
    torch_memops.set_value_checks(device not in value_checking_devices())
    try:
        assert_raises_and_leaves_inputs_alone(*build(valid_inputs(device)), match)
    finally:
        torch_memops.set_value_checks(previous)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", DEVICE_MIX_CASES, ids=[c[0] for c in DEVICE_MIX_CASES])
def test_device_mix_raises(device, case):
    _, build, match = case
    for other in other_devices(device):
        assert_raises_and_leaves_inputs_alone(*build(valid_inputs(device), other), match)



# --- autograd: the ops have no backward and say so ------------------------------------------------

GRAD_CASES = [
    ("prepare/keys", lambda v: prepare(v, keys=v.keys.requires_grad_()), "`keys` requires grad"),
    ("prepare_/summary-leaf", lambda v: prepare_inplace(v, summary=v.summary.requires_grad_()),
     "`summary` requires grad.*writes into it in place"),
    ("topk/query", lambda v: topk(v, query=v.query.requires_grad_()), "`query` requires grad"),
    ("gather/memory", lambda v: gather(v, memory=v.keys.requires_grad_()),
     "`memory` requires grad"),
    ("apply/v_cache", lambda v: apply(v, v_cache=v.values.requires_grad_()),
     "`v_cache` requires grad"),
    ("merge/lse_b", lambda v: merge(v, lse_b=v.lse.clone().requires_grad_()),
     "`lse_b` requires grad"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_inputs_that_require_grad_are_refused(device, case):
    _, build, match = case
    fn, args, kwargs = build(valid_inputs(device))
    assert_raises_and_leaves_inputs_alone(fn, args, kwargs, match + ".*torch.no_grad")
    # Without grad mode the same call runs (as aten's in-place ops do on a leaf), and its new
    # outputs carry no grad_fn.
    with torch.no_grad():
        result = fn(*args, **kwargs)
    for t in result if isinstance(result, tuple) else (result,):
        if not any(t is a for a in args):
            assert t.grad_fn is None and not t.requires_grad
