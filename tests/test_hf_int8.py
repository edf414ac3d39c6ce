"""The HF cache with method "quest_int8" (int8 summaries, torch_memops/hf/methods/quest_int8.py)
on tiny random models (CPU): the same attention as dense at full budget, its packed summary
equal to prepare_memory(mode="minmax_int8") of the layer's keys after prefill and decode steps
(dynamic and static caches), with the sink and current pages selected."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import (  # noqa: E402
    FULL_BUDGET,
    LOGIT_ATOL,
    LOGIT_RTOL,
    PAGE,
    memops_layers,
    prompt,
    teacher_forced_logits,
    tiny_model,
)
from transformers import DynamicCache  # noqa: E402

from torch_memops import hf, ops  # noqa: E402
from torch_memops.hf.methods.quest_int8 import packed_views  # noqa: E402


def test_quest_int8_with_full_budget_matches_dense():
    model = tiny_model("llama")
    ids = prompt(length=61)
    dense = teacher_forced_logits(model, ids, DynamicCache(config=model.config), steps=6)
    config = hf.MemopsConfig(method="quest_int8", page_size=PAGE, token_budget=FULL_BUDGET)
    with hf.enable(model, config) as session:
        pipelined = teacher_forced_logits(model, ids, session.new_cache(), steps=6)
    torch.testing.assert_close(pipelined, dense, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quest_int8_summary_and_selection_follow_the_ops(static):
    model = tiny_model("llama")
    ids = prompt(length=100)
    config = hf.MemopsConfig(method="quest_int8", page_size=PAGE, token_budget=5 * PAGE,
                             dense_layers=1, sink_pages=1, recent_pages=1)
    with hf.enable(model, config) as session:
        cache = session.new_cache(max_cache_len=128) if static else session.new_cache()
        arg = hf.cache_argument(model)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **{arg: cache})
            for _ in range(11):  # crosses a page boundary
                out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{arg: cache})
            for layer in memops_layers(cache)[1:]:
                length = int(layer.seq_lens_host[0])
                assert length == ids.shape[1] + 11
                keys = layer.keys[:, :, :length]
                want = ops.prepare_memory(keys, PAGE, mode="minmax_int8")
                pages = want.codes.shape[2]
                summary = layer.storage.summary
                # A page is its two rows of D code bytes + 16 (scale, padding): 2 (D + 16) bytes.
                assert summary.shape[-1] * summary.element_size() == keys.shape[-1] + 16
                got = packed_views(summary[:, :, :pages])
                assert torch.equal(got.codes, want.codes)
                assert torch.equal(got.scales, want.scales)
                if not static:  # the static cache keeps no host-side record of its selection
                    selection = layer.last_selection
                    assert selection.shape == (1, 2, 5) and int(selection[0, 0, 0]) == 0
                    assert bool((selection[..., -1] == (length - 1) // PAGE).all())


def test_quest_int8_compiled_static_decode_gives_eager_tokens():
    from test_hf_static import BACKEND, greedy_loop

    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = prompt(length=45)
    config = hf.MemopsConfig(method="quest_int8", page_size=PAGE, token_budget=3 * PAGE,
                             dense_layers=1)
    with hf.enable(model, config) as session:
        eager = greedy_loop(model, session.new_cache(max_cache_len=72), ids, steps=6)
        dynamic = greedy_loop(model, session.new_cache(), ids, steps=6)
        compiled_forward = torch.compile(model.forward, fullgraph=True, backend=BACKEND)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = greedy_loop(model, session.new_cache(max_cache_len=72), ids, steps=6,
                                   forward=compiled_forward)
    assert torch.equal(eager, dynamic), "static and dynamic caches select the same pages"
    assert torch.equal(compiled, eager)


def test_compiled_int8_summary_refresh_stays_in_place():
    """Under inductor the decode refresh of the int8 summary writes its one page per row in
    place: no loop of the generated code runs over the whole summary (written through an int8
    view of the buffer, it compiled into whole-summary copies and a copy back, per layer and step:
    on an H200 quest_int8 compiled took 12.2 ms a token against quest's 8.2, at batch 8, 32K).
    The refreshed summary is prepare_memory(mode="minmax_int8") of the keys, byte for byte."""
    from torch._inductor.utils import run_and_get_code

    method = hf.get_method("quest_int8")
    batch, heads, pages, page_size, dim = 2, 3, 300, 16, 64
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(batch, heads, pages * page_size, dim, generator=generator).to(torch.bfloat16)
    seq_lens = torch.tensor([37, 4790], dtype=torch.int32)
    summary = torch.zeros(batch, heads, pages, 2, method.summary_dim(dim, torch.bfloat16), dtype=torch.bfloat16)
    method.prepare(summary, keys, page_size, 0, seq_lens - 1)  # before the newest token
    expected = summary.clone()
    method.prepare(expected, keys, page_size, 0, seq_lens)
    torch._dynamo.mark_static_address(summary)

    def refresh(summary, keys, seq_lens):
        method.prepare_decode(summary, keys, page_size, seq_lens)

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(refresh, fullgraph=True), summary, keys, seq_lens)
    torch._dynamo.reset()
    assert not torch.equal(summary.view(torch.int16), torch.zeros_like(summary, dtype=torch.int16))
    assert torch.equal(summary.view(torch.int16), expected.view(torch.int16))
    code = "\n".join(code)
    for whole in (summary.numel(), summary.numel() * summary.element_size()):
        assert f"{whole}L" not in code, f"a loop over the whole summary ({whole} elements) in the compiled refresh"


def test_float32_bytes_are_the_memory_bytes():
    """quest_int8 writes each page's scale as its four bytes computed by shifts (a dtype view of
    a size-1 last dim fails under inductor on CUDA); they must be the bytes in memory, for every
    kind of scale the quantiser makes (0, powers of two down to subnormals, inf, NaN) and random
    bit patterns."""
    from torch_memops.hf.methods.quest_int8 import float32_bytes

    special = torch.tensor([0.0, 1.0, 2.0 ** -149, 2.0 ** -126, 2.0 ** 127, math.inf, math.nan, -0.0])
    patterns = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 5, 64), dtype=torch.int32).view(torch.float32)
    for values in (special, patterns):
        assert torch.equal(float32_bytes(values), values[..., None].view(torch.int8))
