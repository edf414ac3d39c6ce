"""quest_topp, the adaptive-budget selector: the shortest prefix of the pages ranked by estimated
attention mass that reaches top_p (against a float64 loop reference), its output contract, no host
sync, static == dynamic == compiled tokens, and every page (= dense) at top_p = 1 (CPU)."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from host_sync import forbid_host_sync  # noqa: E402
from test_eval_selectors import LOGIT_ATOL, decode_logits, tiny_model, tokens  # noqa: E402
from test_hf_static import BACKEND, greedy_loop  # noqa: E402

from torch_memops import hf, reference  # noqa: E402
from torch_memops.hf import methods  # noqa: E402
from torch_memops.hf.methods.base import SelectionInputs  # noqa: E402


def topp_inputs(query, keys, summary, seq_lens, page, budget, top_p, sink=1, recent=1, reduce="max",
                method="quest_topp"):
    config = hf.MemopsConfig(method=method, page_size=page, token_budget=budget * page, top_p=top_p,
                             sink_pages=sink, recent_pages=recent, group_reduce=reduce)
    seq_lens = seq_lens.to(torch.int32)
    return SelectionInputs(query=query, keys=keys, summary=summary, seq_lens=seq_lens,
                           num_pages=(seq_lens + page - 1) // page, budget_pages=budget, page_size=page,
                           scale=query.shape[-1] ** -0.5, config=config, layer_idx=0)


def reference_topp(query, keys, seq_lens, page, budget, top_p, sink, recent, reduce, estimate):
    """Per (row, kv head): the selected page set, the cumulative estimated mass at each selected
    position and each page's estimated logit, by explicit float64 loops from the keys (their
    per-page min/max; Quest's bound, or the mean of Quest's upper and lower bounds)."""
    batch, query_heads, dim = query.shape
    kv_heads = keys.shape[1]
    group = query_heads // kv_heads
    scale = dim ** -0.5
    out = {}
    for b in range(batch):
        length = int(seq_lens[b])
        pages = math.ceil(length / page)
        for kv in range(kv_heads):
            logits = []
            for n in range(pages):
                chunk = keys[b, kv, n * page:min((n + 1) * page, length)].double()
                low, high = chunk.min(0).values, chunk.max(0).values
                heads = []
                for g in range(group):
                    q = query[b, kv * group + g].double()
                    terms = [(float(q[d] * low[d]), float(q[d] * high[d])) for d in range(dim)]
                    upper = sum(max(t) for t in terms)
                    heads.append(upper if estimate == "bound" else (upper + sum(min(t) for t in terms)) / 2)
                score = max(heads) if reduce == "max" else sum(heads) / group
                logits.append(score * scale + math.log(chunk.shape[0]))
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            mass = [w / sum(weights) for w in weights]
            forced = [n for n in range(pages) if n < sink or n >= pages - recent]
            ranking = forced + sorted((n for n in range(pages) if n not in forced), key=lambda n: (-logits[n], n))
            chosen, total, cumulative = [], 0.0, []
            for n in ranking:
                if len(chosen) >= budget or (len(chosen) >= len(forced) and total >= top_p and top_p < 1):
                    break
                chosen.append(n)
                total += mass[n]
                cumulative.append(total)
            out[b, kv] = (set(chosen), cumulative, logits)
    return out


@pytest.mark.parametrize("method,estimate", [("quest_topp", "bound"), ("quest_topp_mid", "mid")])
@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
@pytest.mark.parametrize("query_heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_selection_is_the_shortest_ranked_prefix_reaching_top_p(method, estimate, reduce, top_p, query_heads,
                                                                kv_heads):
    torch.manual_seed(query_heads * 100 + int(top_p * 10) + (reduce == "sum"))
    page, budget, dim = 8, 9, 16
    keys = torch.randn(3, kv_heads, 150, dim)
    seq_lens = torch.tensor([150, 77, 20])
    summary = reference.prepare_memory(keys, page, mode="minmax", seq_lens=seq_lens.to(torch.int32))
    summary[2, :, 3:] = float("inf")  # row 2's pages past its length: never read
    query = torch.randn(3, query_heads, dim) * 2
    inputs = topp_inputs(query, keys, summary, seq_lens, page, budget, top_p, sink=1, recent=1, reduce=reduce,
                         method=method)
    got = methods.get_method(method).select(inputs)
    assert got.shape == (3, kv_heads, budget) and got.dtype == torch.int32
    want = reference_topp(query, keys, seq_lens, page, budget, top_p, 1, 1, reduce, estimate)
    sizes = set()
    for (b, kv), (expected, cumulative, logits) in want.items():
        row = got[b, kv].tolist()
        selected = [p for p in row if p >= 0]
        assert row == selected + [-1] * (budget - len(selected)), f"-1 padding only at the end: {row}"
        assert selected == sorted(set(selected)), f"ascending, no repeats: {row}"
        sizes.add(len(selected))
        if set(selected) != expected:
            # only a float32 rounding at the p boundary (or a tie in mass) may differ
            near = any(abs(c - top_p) < 1e-5 for c in cumulative[-2:])
            swapped = set(selected) ^ expected
            tie = len(set(selected)) == len(expected) and max(logits[p] for p in swapped) - min(
                logits[p] for p in swapped) < 1e-5
            assert near or tie, (b, kv, sorted(selected), sorted(expected))
    assert len(sizes) > 1 or top_p == 0.95, "the budget adapts: different rows select different page counts"


def test_top_p_one_selects_every_page_up_to_the_budget():
    keys = torch.randn(2, 2, 90, 16)
    seq_lens = torch.tensor([90, 41])
    summary = reference.prepare_memory(keys, 8, mode="minmax", seq_lens=seq_lens.to(torch.int32))
    query = torch.randn(2, 6, 16)
    every = methods.get_method("quest_topp").select(topp_inputs(query, keys, summary, seq_lens, 8, 14, 1.0))
    assert every[0].tolist() == [list(range(12)) + [-1, -1]] * 2
    assert every[1].tolist() == [list(range(6)) + [-1] * 8] * 2
    capped = methods.get_method("quest_topp").select(topp_inputs(query, keys, summary, seq_lens, 8, 5, 1.0))
    assert (capped >= 0).sum(-1).tolist() == [[5, 5], [5, 5]], "capped by the budget"
    assert capped[0, :, 0].tolist() == [0, 0] and capped[0, :, -1].tolist() == [11, 11], "sink and recent pages"


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_where_the_budget_binds_the_selection_is_quests(reduce):
    """top_p = 1 (or a p the budget cuts short) at budget k: exactly quest's top-k pages."""
    keys = torch.randn(3, 2, 200, 16)
    seq_lens = torch.tensor([200, 131, 60], dtype=torch.int32)
    summary = reference.prepare_memory(keys, 8, mode="minmax", seq_lens=seq_lens)
    query = torch.randn(3, 6, 16) * 2
    _, quest = reference.topk_relevancy(query, summary, 6, mode="bound", num_pages=(seq_lens + 7) // 8,
                                        sink_pages=2, recent_pages=1, group_reduce=reduce)
    for top_p in (1.0, 0.99999):
        got = methods.get_method("quest_topp").select(topp_inputs(query, keys, summary, seq_lens, 8, 6, top_p, sink=2,
                                                                  reduce=reduce))
        assert torch.equal(got, quest), top_p


def test_top_p_one_at_full_budget_equals_dense():
    model = tiny_model()
    ids = tokens(70)
    expected = decode_logits(model, transformers.DynamicCache(config=model.config), ids, 6)
    config = hf.MemopsConfig(method="quest_topp", page_size=8, token_budget=1024, dense_layers=0, top_p=1.0)
    with hf.enable(model, config) as session:
        got = decode_logits(model, session.new_cache(), ids, 6)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=LOGIT_ATOL)


def test_top_p_is_validated():
    with pytest.raises(ValueError, match=r"MemopsConfig.top_p must be a number in \(0, 1\], got 1.5"):
        hf.MemopsConfig(method="quest_topp", top_p=1.5)
    with pytest.raises(ValueError, match="top_p"):
        hf.MemopsConfig(top_p=0)
    assert hf.MemopsConfig().method == "quest" and hf.MemopsConfig().page_size == 8


@pytest.mark.parametrize("method", ["quest_topp", "quest_topp_mid"])
def test_select_makes_no_host_sync(method):
    keys = torch.randn(2, 2, 64, 16)
    seq_lens = torch.tensor([64, 30])
    summary = reference.prepare_memory(keys, 8, mode="minmax", seq_lens=seq_lens.to(torch.int32))
    inputs = topp_inputs(torch.randn(2, 6, 16), keys, summary, seq_lens, 8, 4, 0.9, method=method)
    with forbid_host_sync() as ops:
        methods.get_method(method).select(inputs)
    assert ops.count("aten::sort") == 2 and ops.count("aten::cumsum") == 1, "the selection ran under the check"


def test_static_generate_equals_eager_and_compiled():
    """The adaptive selection on the static cache (capacity-sized summary, device lengths), eager and
    compiled with fullgraph=True, gives the dynamic cache's tokens at a budget below the context."""
    torch._dynamo.reset()
    model = tiny_model(max_position_embeddings=256)
    ids = tokens(61, seed=3)
    config = hf.MemopsConfig(method="quest_topp", page_size=8, token_budget=32, dense_layers=1, top_p=0.3)
    with hf.enable(model, config) as session:
        dynamic_cache = session.new_cache()
        dynamic = greedy_loop(model, dynamic_cache, ids, steps=8)
        counts = [(layer.last_selection >= 0).sum(-1) for layer in dynamic_cache.layers if layer.sparse]
        static = greedy_loop(model, session.new_cache(max_cache_len=96), ids, steps=8)
        compiled_forward = torch.compile(model.forward, fullgraph=True, backend=BACKEND)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = greedy_loop(model, session.new_cache(max_cache_len=96), ids, steps=8, forward=compiled_forward)
        with torch.no_grad():
            generated = {name: model.generate(ids, max_new_tokens=8, do_sample=False, disable_compile=True, **extra)
                         for name, extra in (("dynamic", {}), ("static", dict(cache_implementation="static")))}
    assert torch.equal(static, dynamic) and torch.equal(compiled, dynamic)
    assert torch.equal(generated["static"], generated["dynamic"])
    assert torch.equal(generated["dynamic"][:, ids.shape[1]:], dynamic[:, :8])
    assert any(int(c.min()) < 4 for c in counts), "the test selects fewer pages than the budget somewhere"
