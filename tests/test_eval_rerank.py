"""quest_rerank (torch_memops/hf/methods/quest_rerank.py): Quest's candidates reranked by their exact
attention mass, on fresh random tensors (CPU)."""

import pytest
import torch

pytest.importorskip("transformers")

from torch_memops import reference  # noqa: E402
from torch_memops.evaluate import bytes_per_step  # noqa: E402
from torch_memops.hf import methods  # noqa: E402

from test_eval_selectors import (assert_selection_matches, inputs_for, reference_page_mass,  # noqa: E402
                                 tiny_model)


def case(kv_heads=2, query_heads=6, tokens=150, page=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, kv_heads, tokens, 16, generator=g) * 2
    query = torch.randn(2, query_heads, 16, generator=g)
    seq_lens = torch.tensor([tokens, tokens * 2 // 3])
    summary = reference.prepare_memory(keys, page, mode="minmax", seq_lens=seq_lens.to(torch.int32))
    return query, keys, seq_lens, summary


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("query_heads,kv_heads", [(6, 2), (4, 4), (7, 1)])
def test_with_every_page_a_candidate_it_is_the_oracle(reduce, query_heads, kv_heads, monkeypatch):
    """Candidates = all pages: the mass among candidates is the true softmax mass, so the selection is
    the oracle's (top-k of the group-reduced mass, sinks and recent pages forced)."""
    method = methods.get_method("quest_rerank")
    monkeypatch.setattr(method, "candidate_factor", 100)
    query, keys, seq_lens, summary = case(kv_heads, query_heads)
    inputs = inputs_for(query, keys, seq_lens, 8, 5, summary=summary, sink=1, recent=1, reduce=reduce)
    got = method.select(inputs)
    mass = reference_page_mass(query, keys, seq_lens, 8)
    grouped = mass.view(2, kv_heads, query_heads // kv_heads, -1)
    grouped = grouped.amax(2) if reduce == "max" else grouped.sum(2)
    assert got.shape == (2, kv_heads, 5) and got.dtype == torch.int32
    assert_selection_matches(got, grouped, 5, inputs.num_pages, 1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_is_the_best_of_quests_candidates(seed):
    """Factor 4 at budget 3 of 19 pages: every selected page is one of Quest's 12 candidates, the
    sink and recent pages are kept, and the rest are the candidates of largest exact mass."""
    method = methods.get_method("quest_rerank")
    query, keys, seq_lens, summary = case(seed=seed)
    budget = 3
    inputs = inputs_for(query, keys, seq_lens, 8, budget, summary=summary, sink=1, recent=1)
    got = method.select(inputs)
    _, cand = reference.topk_relevancy(query, summary, 4 * budget, mode="bound", num_pages=inputs.num_pages,
                                       sink_pages=1, recent_pages=1, group_reduce="max")
    mass = reference_page_mass(query, keys, seq_lens, 8).view(2, 2, 3, -1)
    for b in range(2):
        pages = int(inputs.num_pages[b])
        for h in range(2):
            chosen = [int(p) for p in got[b, h] if p >= 0]
            pool = {int(p) for p in cand[b, h] if p >= 0}
            assert set(chosen) <= pool and 0 in chosen and pages - 1 in chosen
            # Among the candidates, each query head's exact mass renormalised over the candidates,
            # the group's max, ranks the rest.
            share = mass[b, h][:, sorted(pool)].sum(-1)  # [G]: each head's mass on the candidates
            scores = {p: float((mass[b, h, :, p] / share).max()) for p in pool - {0, pages - 1}}
            free = sorted(scores, key=lambda p: -scores[p])[:budget - 2]
            assert set(chosen) - {0, pages - 1} == set(free) or \
                abs(min(scores[p] for p in set(chosen) - {0, pages - 1}) - scores[free[-1]]) < 1e-6


def test_bytes_count_the_candidate_keys():
    model = tiny_model()
    from torch_memops import hf

    quest = bytes_per_step(model, hf.MemopsConfig(method="quest", page_size=8, token_budget=64, dense_layers=1), 1000)
    rerank = bytes_per_step(model, hf.MemopsConfig(method="quest_rerank", page_size=8, token_budget=64,
                                                   dense_layers=1), 1000)
    # 2 sparse layers x 2 kv heads x (4 x 64 candidate tokens) x 16 dims x 4 bytes.
    assert rerank["candidate_keys"] == 2 * 2 * 256 * 16 * 4 and quest["candidate_keys"] == 0
    assert rerank["total"] == quest["total"] + rerank["candidate_keys"]
