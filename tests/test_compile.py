"""The whole pipeline under torch.compile(fullgraph=True) equals eager execution."""

import pytest
import torch
from helpers import assert_bitwise_equal, cpu, devices, dtype_id, randn, strided_cache, to_device

from torch_memops import ops

P, K_PAGES, RECENT = 8, 3, 11


def pipeline(summary, query, k_cache, v_cache, memory_tokens):
    """Decode step: update the summary, select pages of the memory part, gather them, attend
    to them and to the recent window, merge the two partial attentions."""
    memory_k, memory_v = k_cache[:, :, :memory_tokens], v_cache[:, :, :memory_tokens]
    ops.prepare_memory_(summary, memory_k, P, memory_tokens // P - 1)
    scores, indices = ops.topk_relevancy(query, summary, K_PAGES, sink_pages=1)
    gathered_k, lengths = ops.gather_retrieve(memory_k, indices, P)
    gathered_v, _ = ops.gather_retrieve(memory_v, indices, P)
    # Slot j of the gathered buffers is page j there: attend to the slots that hold a page.
    slots = torch.arange(K_PAGES, dtype=torch.int32, device=indices.device).expand_as(indices)
    slot_indices = torch.where(indices >= 0, slots, torch.full_like(indices, -1))
    selected = ops.sparse_apply(query, gathered_k, gathered_v, slot_indices, P)
    recent = ops.sparse_apply(query, k_cache[:, :, memory_tokens:], v_cache[:, :, memory_tokens:],
                              None, P)
    out, lse = ops.merge_attention(*selected, *recent)
    direct = ops.sparse_apply(query, memory_k, memory_v, indices, P)
    return summary, scores, indices, lengths, out, lse, selected[0], direct[0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_compiled_pipeline_equals_eager(device, dtype):
    B, Hkv, G, D, memory_tokens = 2, 2, 4, 16, 48  # 6 full pages of memory
    S = memory_tokens + RECENT
    query = randn(B, Hkv * G, D, dtype=dtype)
    k_cache, v_cache = strided_cache(B, Hkv, S, D, dtype), strided_cache(B, Hkv, S, D, dtype)
    summary = ops.prepare_memory(k_cache[:, :, :memory_tokens - 3], P)
    inputs = to_device(device, query, k_cache, v_cache)
    eager = pipeline(to_device(device, summary.clone()), *inputs, memory_tokens)
    torch._dynamo.reset()
    compiled_fn = torch.compile(pipeline, fullgraph=True)
    compiled = compiled_fn(to_device(device, summary.clone()), *inputs, memory_tokens)
    # The same kernels on the same data: bit-identical results.
    for got, want in zip(compiled, eager):
        assert_bitwise_equal(cpu(got), cpu(want))
    # Attending to the gathered pages is the same computation, token for token, as attending
    # to the selected pages in place.
    selected_out, direct_out = eager[-2:]
    assert_bitwise_equal(cpu(selected_out), cpu(direct_out))


# Every rank error and scalar bound of tests/test_errors.py, traced: the fake kernels raise what
# the eager kernels raise (not "not enough values to unpack" or "tuple index out of range").
def _traced_cases():
    from test_errors import SHAPE_AND_TYPE_CASES

    wanted = ("-rank", "-huge", "scale-", "page_size", "/k-", "/mode", "first_page")
    return [c for c in SHAPE_AND_TYPE_CASES if any(w in c[0] for w in wanted)]


@pytest.mark.parametrize("case", _traced_cases(), ids=[c[0] for c in _traced_cases()])
def test_compiled_bad_arguments_raise_the_eager_error(case):
    from test_errors import valid_inputs

    _, build, match = case
    fn, args, kwargs = build(valid_inputs("cpu"))
    with pytest.raises((RuntimeError, ValueError), match=match) as eager:
        fn(*args, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a, **kwargs), fullgraph=True)
    with pytest.raises(Exception) as traced:
        compiled(*args)
    assert str(eager.value).splitlines()[0] in str(traced.value)
