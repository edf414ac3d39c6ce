"""torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on every op."""

import pytest
import torch
from helpers import (
    ascending_indices,
    devices,
    dtype_id,
    ragged_seq_lens,
    randn,
    strided_cache,
    to_device,
)

from torch_memops import ops

B, HKV, G, S, D, P = 2, 2, 3, 29, 8, 8
N = -(-S // P)


def samples(dtype):
    """(op, args, kwargs) covering every op and its optional arguments, strided views included."""
    keys, values = strided_cache(B, HKV, S, D, dtype), strided_cache(B, HKV, S, D, dtype)
    query = randn(B, HKV * G, D, dtype=dtype)
    seq_lens = ragged_seq_lens(B, S)
    summary = ops.prepare_memory(keys, P)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    indices = ascending_indices(B, HKV, 3, N)
    out, lse = ops.sparse_apply(query, keys, values, indices, P)
    m = torch.ops.memops
    return [
        (m.prepare_memory, (keys, P), {}),
        (m.prepare_memory, (keys, P), {"mode": "mean", "seq_lens": seq_lens}),
        (m.prepare_memory_, (randn(B, HKV, N + 2, 2, D, dtype=dtype), keys, P, 1), {}),
        (m.prepare_memory_, (randn(B, HKV, N, 1, D, dtype=dtype), keys, P, 0),
         {"summary_mode": "mean", "seq_lens": seq_lens}),
        (m.topk_relevancy, (query, summary, 3), {}),
        (m.topk_relevancy, (query, summary, N + 2),
         {"mode": "dot", "num_pages": torch.tensor([N, 1], dtype=torch.int32), "sink_pages": 1,
          "recent_pages": 1, "group_reduce": "sum"}),
        (m.topk_relevancy, (query, ops.prepare_memory(keys[:, :1], P, mode="mean"), 2),
         {"mode": "indexer", "weights": torch.rand(B, HKV * G)}),
        (m.prepare_memory_int8, (keys, P), {"seq_lens": seq_lens}),
        (m.prepare_memory_int8_, (torch.zeros(B, HKV, N + 1, 2, D, dtype=torch.int8),
                                  torch.zeros(B, HKV, N + 1), keys, P, 1), {}),
        (m.topk_relevancy, (query, q8.codes, 3),
         {"summary_scales": q8.scales, "num_pages": torch.tensor([N, 2], dtype=torch.int32),
          "recent_pages": 1, "group_reduce": "sum"}),
        (m.gather_retrieve, (keys, indices, P), {}),
        (m.gather_retrieve, (values, indices, P), {"seq_lens": seq_lens}),
        (m.sparse_apply, (query, keys, values, indices, P), {}),
        (m.sparse_apply, (query, keys, values, ascending_indices(B, HKV * G, 2, N), P),
         {"seq_lens": seq_lens, "scale": 0.25}),
        (m.sparse_apply, (query, keys, values, None, P), {"seq_lens": seq_lens}),
        (m.topk_sparse_apply, (query, summary, keys, values, 3, P), {}),
        (m.topk_sparse_apply, (query, ops.prepare_memory(keys, P, mode="mean"), keys, values, N + 1, P),
         {"mode": "dot", "num_pages": torch.tensor([N, 1], dtype=torch.int32), "seq_lens": seq_lens,
          "sink_pages": 1, "recent_pages": 1, "group_reduce": "sum", "scale": 0.25}),
        (m.topk_sparse_apply, (query, q8.codes, keys, values, 2, P), {"summary_scales": q8.scales}),
        (m.merge_attention, (out, lse, out.flip(1), lse.flip(1)), {}),
        (m.merge_attention, (out[:, ::2], lse[:, ::2], out[:, 1::2], lse[:, 1::2]), {}),
    ]


def move(device, value):
    return to_device(device, value) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_opcheck_every_op(device, dtype):
    cases = samples(dtype)
    checked = set()
    for op, args, kwargs in cases:
        args = tuple(move(device, a) for a in args)
        kwargs = {name: move(device, v) for name, v in kwargs.items()}
        torch.library.opcheck(op, args, kwargs)  # all default test_utils
        checked.add(op._qualified_op_name)
    # Every schema: the wrappers' ops, plus the int8 summary ops behind mode="minmax_int8".
    schemas = {f"memops::{name}" for name in ops.__all__ if name not in ("QuantizedSummary", "TopkApplyResult")}
    schemas |= {"memops::prepare_memory_int8", "memops::prepare_memory_int8_"}
    assert checked == schemas, checked


@pytest.mark.parametrize("call,argument", [
    (lambda q, s, k: ops.prepare_memory(k, 0), "page_size"),
    (lambda q, s, k: ops.prepare_memory(k, P, mode="median"), "mode"),
    (lambda q, s, k: ops.prepare_memory_(s, k, P, -1), "first_page"),
    (lambda q, s, k: ops.topk_relevancy(q, s, 0), "k"),
    (lambda q, s, k: ops.topk_relevancy(q, s, 2, sink_pages=-1), "sink_pages"),
    (lambda q, s, k: ops.topk_relevancy(q, s, 2, group_reduce="mean"), "group_reduce"),
    (lambda q, s, k: ops.gather_retrieve(k, torch.zeros(B, HKV, 2, dtype=torch.int32), 0),
     "page_size"),
    (lambda q, s, k: ops.sparse_apply(q, k, k, None, 0), "page_size"),
])
def test_fake_kernels_reject_bad_scalars_like_the_eager_op(call, argument):
    # Under torch.compile the fake kernels see the arguments first: they raise the same
    # ValueError, naming the argument, as the eager op does.
    from torch._subclasses.fake_tensor import FakeTensorMode

    keys = randn(B, HKV, S, D, dtype=torch.float32)
    query = randn(B, HKV * G, D, dtype=torch.float32)
    summary = ops.prepare_memory(keys, P)
    with pytest.raises(ValueError, match=f"`{argument}`") as eager:
        call(query, summary, keys)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (query, summary, keys)]
        with pytest.raises(ValueError, match=f"`{argument}`") as traced:
            call(*fakes)
    assert str(traced.value) == str(eager.value)
