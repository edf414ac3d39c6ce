"""The method registry: a new method is one class plus one registry entry, and the cache runs it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import PAGE, prompt, teacher_forced_logits, tiny_model  # noqa: E402

from torch_memops import hf, reference  # noqa: E402
from torch_memops.hf.methods import METHODS, Method, get_method, register_method  # noqa: E402


class LastPages(Method):
    """Selects the row's last `budget_pages` valid pages (a sliding window), no summary."""

    name = "test-last-pages"
    summary_mode = None

    def select(self, inputs):
        k = inputs.budget_pages
        first = (inputs.num_pages - k).clamp(min=0)[:, None, None]
        pages = first + torch.arange(k, device=inputs.seq_lens.device)
        pages = torch.where(pages < inputs.num_pages[:, None, None], pages, -1).to(torch.int32)
        return pages.expand(-1, inputs.keys.shape[1], -1).contiguous()


@pytest.fixture
def last_pages():
    method = register_method(LastPages())
    yield method
    METHODS.pop(method.name)


@pytest.mark.parametrize("static", [False, True])
def test_a_registered_method_runs_in_the_cache(last_pages, static):
    model = tiny_model("llama")
    ids = prompt(length=70)
    config = hf.MemopsConfig(method=last_pages.name, page_size=PAGE, token_budget=3 * PAGE, sink_pages=0,
                             dense_layers=0)
    captured = {}
    original = hf.MemopsLayer.decode_attention

    def capture(layer, query, scale):
        out = original(layer, query, scale)
        if layer.layer_idx == 1:
            captured.update(query=query, keys=layer.keys.clone(), values=layer.values.clone(), out=out,
                            seq_lens=layer.seq_lens_on(query.device).clone())
        return out

    with hf.enable(model, config) as session:
        cache = session.new_cache(max_cache_len=96 if static else None)
        hf.MemopsLayer.decode_attention = capture
        try:
            teacher_forced_logits(model, ids, cache, steps=3)
        finally:
            hf.MemopsLayer.decode_attention = original
    assert cache.layers[1].storage.summary is None, "a method without summary gets none"
    length = int(captured["seq_lens"][0])
    assert length == 73
    last = (length - 1) // PAGE
    indices = torch.arange(last - 2, last + 1, dtype=torch.int32).view(1, 1, 3).expand(1, 2, 3)
    expected, _ = reference.sparse_apply(captured["query"], captured["keys"][:, :, :length],
                                         captured["values"][:, :, :length], indices, PAGE,
                                         scale=model.model.layers[1].self_attn.scaling)
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def test_registry_refuses_bad_entries():
    assert {"dense", "mean", "quest", "quest_int8"} <= set(METHODS)
    assert get_method("quest").summary_mode == "minmax"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Quest2", (Method,), {"name": "quest"})())
    with pytest.raises(ValueError, match="summary_mode must be one of"):
        register_method(type("Bad", (Method,), {"name": "test-bad", "summary_mode": "median"})())
    with pytest.raises(TypeError, match="expected a Method instance"):
        register_method("quest")
    with pytest.raises(ValueError, match="MemopsConfig.method must be one of"):
        hf.MemopsConfig(method="test-unregistered")


def test_prepare_decode_equals_the_prepare_memory_kernel():
    """The static cache's per-row page refresh gives the kernel's summary of that page."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 2, 64, 16, generator=generator)
    seq_lens = torch.tensor([64, 37, 9], dtype=torch.int32)
    for mode in ("minmax", "mean"):
        method = get_method("quest" if mode == "minmax" else "mean")
        expected = reference.prepare_memory(keys, PAGE, mode=mode, seq_lens=seq_lens)
        summary = expected.clone()
        pages = (seq_lens.long() - 1) // PAGE
        for row, page in enumerate(pages.tolist()):
            summary[row, :, page] = float("nan")  # poisoned: must be rewritten
        method.prepare_decode(summary, keys, PAGE, seq_lens)
        # minmax is exact; the mean is a float32 sum in another order than the reference's.
        tolerance = 0 if mode == "minmax" else 1e-6
        torch.testing.assert_close(summary, expected, atol=tolerance, rtol=tolerance)
