"""The evaluation selectors of the method registry (oracle, streaming, random, per-query-head quest
and mean) on tiny random models and on fresh random tensors (CPU)."""

import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_memops import hf, reference  # noqa: E402
from torch_memops.hf import methods  # noqa: E402
from torch_memops.hf.methods.base import SelectionInputs  # noqa: E402

VOCAB = 97
# With every page selected a selector's attention is dense attention summed in another order
# (float32 in sparse_apply): a few ulp per layer, at most ~1e-5 on these logits (as test_hf.py).
LOGIT_ATOL = 1e-4


def tiny_model(seed=0, **overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  attn_implementation="sdpa")
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def tokens(length, seed=1):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, cache, ids, steps):
    """Prefill ``ids`` into ``cache`` then ``steps`` teacher-forced decode steps; all logits."""
    fed = tokens(steps, seed=5)
    with torch.no_grad():
        out = [model(input_ids=ids, use_cache=True, **{hf.cache_argument(model): cache}).logits[:, -1]]
        for step in range(steps):
            out.append(model(input_ids=fed[:, step:step + 1], use_cache=True, **{hf.cache_argument(model): cache}).logits[:, -1])
    return torch.stack(out, 1)


class Recorder(methods.Method):
    """Wraps a registered method and keeps every SelectionInputs it saw and what it returned."""

    def __init__(self, inner):
        self.inner, self.name, self.summary_mode = inner, inner.name, inner.summary_mode
        self.calls = []

    def select(self, inputs):
        indices = self.inner.select(inputs)
        self.calls.append((inputs, indices))
        return indices


@pytest.fixture
def recorded(monkeypatch):
    """``recorded(name)`` swaps the registered method for a Recorder of it (restored after the test)."""
    def swap(name):
        recorder = Recorder(methods.get_method(name))
        monkeypatch.setitem(methods.METHODS, name, recorder)
        return recorder
    return swap


def inputs_for(query, keys, seq_lens, page_size, budget, summary=None, sink=0, recent=1, reduce="max"):
    config = hf.MemopsConfig(method="quest", page_size=page_size, token_budget=budget * page_size,
                             sink_pages=sink, recent_pages=recent, group_reduce=reduce)
    num_pages = (seq_lens + page_size - 1) // page_size
    return SelectionInputs(query=query, keys=keys, summary=summary, seq_lens=seq_lens.to(torch.int32),
                           num_pages=num_pages.to(torch.int32), budget_pages=budget, page_size=page_size,
                           scale=query.shape[-1] ** -0.5, config=config, layer_idx=0)


def reference_page_mass(query, keys, seq_lens, page_size):
    """float64 softmax mass per (query head, page), by explicit loops over rows."""
    batch, query_heads, _ = query.shape
    kv_heads, tokens_ = keys.shape[1], keys.shape[2]
    pages = math.ceil(tokens_ / page_size)
    mass = torch.zeros(batch, query_heads, pages, dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        for h in range(query_heads):
            k = keys[b, h // (query_heads // kv_heads), :length].double()
            p = torch.softmax(k @ query[b, h].double() * query.shape[-1] ** -0.5, dim=0)
            for t in range(length):
                mass[b, h, t // page_size] += p[t]
    return mass


def assert_selection_matches(indices, mass, budget, num_pages, sink, recent, tie_tolerance=1e-6):
    """``indices`` equal reference.select_topk of ``mass``, except swaps of pages within the tolerance."""
    _, expected = reference.select_topk(mass.float(), budget, num_pages=num_pages, sink_pages=sink,
                                        recent_pages=recent)
    for b in range(indices.shape[0]):
        for h in range(indices.shape[1]):
            got = {int(p) for p in indices[b, h] if p >= 0}
            want = {int(p) for p in expected[b, h] if p >= 0}
            assert len(got) == len(want), (b, h, sorted(got), sorted(want))
            if got != want:
                lost = min(float(mass[b, h, p]) for p in want - got)
                taken = max(float(mass[b, h, p]) for p in got - want)
                assert abs(lost - taken) <= tie_tolerance, (b, h, sorted(got), sorted(want))
    valid = indices >= 0
    assert torch.all(indices[..., 1:][valid[..., 1:]] > indices[..., :-1][valid[..., 1:]]), "not ascending"


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("query_heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_oracle_is_topk_of_true_attention_mass(reduce, query_heads, kv_heads):
    page, budget = 8, 5
    keys = torch.randn(2, kv_heads, 77, 16) * 2
    query = torch.randn(2, query_heads, 16)
    seq_lens = torch.tensor([77, 45])
    inputs = inputs_for(query, keys, seq_lens, page, budget, sink=1, recent=1, reduce=reduce)
    mass = reference_page_mass(query, keys, seq_lens, page)
    grouped = mass.view(2, kv_heads, query_heads // kv_heads, -1)
    grouped = grouped.amax(2) if reduce == "max" else grouped.sum(2)
    got = methods.get_method("oracle").select(inputs)
    assert got.shape == (2, kv_heads, budget) and got.dtype == torch.int32
    assert_selection_matches(got, grouped, budget, inputs.num_pages, 1, 1)
    per_head = methods.get_method("oracle_head").select(inputs)
    assert per_head.shape == (2, query_heads, budget)
    assert_selection_matches(per_head, mass, budget, inputs.num_pages, 1, 1)


def test_oracle_on_a_tiny_model_selects_the_pages_of_the_reference_attention_mass(recorded):
    """Layer 0 (sparse: dense_layers=0) sees the same query and keys as dense attention, so the
    oracle's pages are the top-k of eager attention's own weights (output_attentions)."""
    model = tiny_model()
    ids = tokens(90)
    recorder = recorded("oracle")
    config = hf.MemopsConfig(method="oracle", page_size=8, token_budget=40, dense_layers=0, sink_pages=1)
    with hf.enable(model, config) as session:
        cache = session.new_cache()
        decode_logits(model, cache, ids[:, :-1], 0)
        with torch.no_grad():
            model(input_ids=ids[:, -1:], use_cache=True, **{hf.cache_argument(model): cache})
    inputs, indices = recorder.calls[0]
    assert inputs.layer_idx == 0 and indices.shape == (1, 2, 5)
    eager = tiny_model(attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions[0][:, :, -1]  # [1, Hq, S]
    mass = torch.nn.functional.pad(attentions.double(), (0, 6)).view(1, 6, 12, 8).sum(-1)
    grouped = mass.view(1, 2, 3, 12).amax(2)
    assert_selection_matches(indices, grouped, 5, torch.tensor([12]), 1, 1)


def test_streaming_selects_sinks_and_the_newest_pages():
    keys = torch.randn(2, 3, 100, 8)
    seq_lens = torch.tensor([100, 37])
    inputs = inputs_for(torch.randn(2, 6, 8), keys, seq_lens, 8, 5, sink=2, recent=1)
    got = methods.get_method("streaming").select(inputs)
    assert got[0].tolist() == [[0, 1, 10, 11, 12]] * 3
    assert got[1].tolist() == [[0, 1, 2, 3, 4]] * 3


def test_random_pages_are_seeded_valid_and_keep_sinks_and_recent():
    keys = torch.randn(2, 3, 300, 8)
    seq_lens = torch.tensor([300, 170])
    inputs = inputs_for(torch.randn(2, 6, 8), keys, seq_lens, 10, 6, sink=1, recent=2)
    method = methods.get_method("random")
    first, again = method.select(inputs), method.select(inputs)
    assert torch.equal(first, again)
    other_layer = method.select(dataclasses.replace(inputs, layer_idx=1))
    assert not torch.equal(first, other_layer)
    for b, pages in enumerate((30, 17)):
        for row in first[b].tolist():
            assert row == sorted(set(row)) and len(row) == 6
            assert row[0] == 0 and row[-2:] == [pages - 2, pages - 1] and row[-1] < pages
    # The draws are spread over the pages, not a fixed pattern: the three heads differ.
    assert len({tuple(r) for r in first[0].tolist()}) > 1


@pytest.mark.parametrize("name,mode", [("quest_head", "bound"), ("mean_head", "dot")])
def test_per_query_head_selection_is_each_heads_own_topk(name, mode):
    method = methods.get_method(name)
    keys = torch.randn(2, 2, 90, 16)
    seq_lens = torch.tensor([90, 41])
    summary = reference.prepare_memory(keys, 8, mode=method.summary_mode, seq_lens=seq_lens.to(torch.int32))
    query = torch.randn(2, 6, 16)
    inputs = inputs_for(query, keys, seq_lens, 8, 4, summary=summary, sink=1, recent=1)
    got = method.select(inputs)
    assert got.shape == (2, 6, 4)
    for h in range(6):
        _, expected = reference.topk_relevancy(query[:, h:h + 1], summary[:, h // 3:h // 3 + 1], 4, mode=mode,
                                               num_pages=inputs.num_pages, sink_pages=1, recent_pages=1)
        assert torch.equal(got[:, h:h + 1], expected), h


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_full_budget_equals_dense_for_every_selector(name):
    """A budget above the context selects every page: logits equal dense SDPA attention's (top_p = 1:
    an adaptive budget's full mass)."""
    model = tiny_model()
    ids = tokens(70)
    expected = decode_logits(model, transformers.DynamicCache(config=model.config), ids, 6)
    config = hf.MemopsConfig(method=name, page_size=8, token_budget=1024, dense_layers=0, top_p=1.0)
    with hf.enable(model, config) as session:
        got = decode_logits(model, session.new_cache(), ids, 6)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
