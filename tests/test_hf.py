"""torch_memops.hf on tiny random models of every supported family (CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from torch_memops import hf, ops, reference  # noqa: E402

VOCAB = 97
PAGE = 8
# A budget far above every context of these tests: every page is selected.
FULL_BUDGET = 4096
# float32 throughout. With every page selected the pipeline computes the same attention as SDPA,
# summed in another order (float32 accumulation in sparse_apply); the differences are a few ulp
# per layer, which the tiny models amplify to at most ~1e-5 on logits of magnitude ~1.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
}


def tiny_model(family="llama", seed=0, **overrides):
    config_name, model_name, family_kwargs = FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  attn_implementation="sdpa")
    kwargs.update(family_kwargs)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def prompt(batch=1, length=83, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def teacher_forced_logits(model, input_ids, cache, steps, attention_mask=None):
    """Prefill logits of the last position, then the logits of `steps` decode steps fed fixed tokens."""
    forced = prompt(input_ids.shape[0], steps, seed=7)
    mask = attention_mask
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **{hf.cache_argument(model): cache})
        logits = [out.logits[:, -1]]
        for step in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=forced[:, step:step + 1], attention_mask=mask, use_cache=True,
                        **{hf.cache_argument(model): cache})
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def memops_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, hf.MemopsLayer)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_budget_logits_match_dense(family):
    model = tiny_model(family)
    ids = prompt()
    dense = teacher_forced_logits(model, ids, DynamicCache(config=model.config), steps=12)
    config = hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET, dense_layers=1)
    with hf.enable(model, config) as session:
        cache = session.new_cache()
        pipelined = teacher_forced_logits(model, ids, cache, steps=12)
    sparse_layers = [layer for layer in memops_layers(cache) if layer.sparse]
    assert len(sparse_layers) == 3
    for layer in sparse_layers:
        assert int(layer.attended_tokens().min()) == ids.shape[1] + 12
    torch.testing.assert_close(pipelined, dense, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_budget_greedy_generate_matches_dense(family):
    model = tiny_model(family)
    ids = prompt()
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=16, do_sample=False)
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
            pipelined = model.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    cache = pipelined["cache"] if "cache" in pipelined else pipelined["past_key_values"]
    assert type(cache).__name__ == "MemopsCache", "generate() built a MemopsCache"
    assert torch.equal(pipelined.sequences, dense)


@pytest.mark.parametrize("method", ["quest", "mean", "dense"])
def test_methods_with_full_budget_match_dense(method):
    model = tiny_model("llama")
    ids = prompt(length=61)
    dense = teacher_forced_logits(model, ids, DynamicCache(config=model.config), steps=6)
    with hf.enable(model, hf.MemopsConfig(method=method, page_size=PAGE, token_budget=FULL_BUDGET)) as session:
        pipelined = teacher_forced_logits(model, ids, session.new_cache(), steps=6)
    torch.testing.assert_close(pipelined, dense, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_sampled_generate_matches_dense_with_full_budget():
    model = tiny_model("qwen2")
    ids = prompt(batch=2)
    with torch.no_grad():
        torch.manual_seed(123)
        dense = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
            torch.manual_seed(123)
            pipelined = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(pipelined, dense)


def test_beam_search_matches_dense_with_full_budget():
    model = tiny_model("llama")
    ids = prompt(batch=2, length=50)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
            pipelined = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(pipelined, dense)


@pytest.mark.parametrize("method", ["quest", "mean"])
def test_small_budget_selects_only_the_budget(method):
    model = tiny_model("llama")
    ids = prompt(length=150)
    config = hf.MemopsConfig(method=method, page_size=PAGE, token_budget=4 * PAGE, sink_pages=1, recent_pages=1,
                             dense_layers=1)
    with hf.enable(model, config) as session:
        cache = session.new_cache()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **{hf.cache_argument(model): cache})
            for step in range(5):
                token = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=token, use_cache=True, **{hf.cache_argument(model): cache})
                length = ids.shape[1] + step + 1
                last_page = (length - 1) // PAGE
                for layer in memops_layers(cache)[1:]:
                    selection = layer.last_selection
                    assert selection.shape == (1, 2, 4)
                    assert bool((selection[..., 0] == 0).all()), "the sink page is always selected"
                    assert bool((selection[..., -1] == last_page).all()), "the current page is always selected"
                    attended = layer.attended_tokens()
                    expected = 3 * PAGE + (length - last_page * PAGE)
                    assert attended.tolist() == [[expected, expected]]
                assert memops_layers(cache)[0].last_selection is None, "the leading dense layer selects nothing"


def test_sparse_decode_matches_reference_pipeline():
    """One sparse layer's decode output equals the pure-PyTorch reference of its four steps."""
    model = tiny_model("llama")
    ids = prompt(length=100)
    config = hf.MemopsConfig(page_size=PAGE, token_budget=5 * PAGE, dense_layers=0)

    with hf.enable(model, config) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{hf.cache_argument(model): cache})
            layer = cache.layers[2]
            query = torch.randn(1, 6, 16)
            got = layer.decode_attention(query, 0.25)
    summary = reference.prepare_memory(layer.keys, PAGE, mode="minmax")
    torch.testing.assert_close(layer.storage.summary[:, :, :summary.shape[2]], summary, atol=0, rtol=0)
    _, indices = reference.topk_relevancy(query, summary, 5, mode="bound", sink_pages=1, recent_pages=1)
    assert torch.equal(layer.last_selection, indices)
    expected, _ = reference.sparse_apply(query, layer.keys, layer.values, indices, PAGE, scale=0.25)
    # float32 attention over at most 40 tokens: kernel and reference differ only in summation order.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_profile_times_every_step_of_every_decode():
    model = tiny_model("llama")
    profile = hf.StepProfile()
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=1)) as session:
        cache = session.new_cache()
        for layer in cache.layers:
            layer.profile = profile
        teacher_forced_logits(model, prompt(), cache, steps=4)
    summary = profile.summary(decode_steps=4)
    assert set(summary["decode_ms_per_step"]) == {"prepare", "relevancy", "apply", "dense"}
    assert set(summary["prefill_ms"]) == {"prepare"}
    assert all(value > 0 for value in summary["decode_ms_per_step"].values())
    assert summary["bytes_moved_per_decode_step"] == {}, "one device: nothing crosses"
    assert "relevancy" in profile.table(decode_steps=4)


def test_retrieve_and_apply_equals_in_place_apply():
    """The split path (gather the selected pages, then attend) attends to exactly the same tokens."""
    generator = torch.Generator().manual_seed(3)
    keys_buf = torch.randn(3, 2, 120, 16, generator=generator)
    values_buf = torch.randn(3, 2, 120, 16, generator=generator)
    keys, values = keys_buf[:, :, :101], values_buf[:, :, :101]
    seq_lens = torch.tensor([101, 37, 5], dtype=torch.int32)
    query = torch.randn(3, 6, 16, generator=generator)
    summary = ops.prepare_memory(keys, PAGE, seq_lens=seq_lens)
    num_pages = (seq_lens + PAGE - 1) // PAGE
    _, indices = ops.topk_relevancy(query, summary, 4, num_pages=num_pages, sink_pages=1, recent_pages=1)
    expected, _ = ops.sparse_apply(query, keys, values, indices, PAGE, seq_lens=seq_lens, scale=0.3)
    got = hf.retrieve_and_apply(query, keys, values, indices, PAGE, seq_lens, 0.3, torch.device("cpu"))
    # Same tokens in the same order; only the kernel's tiling of the token loop may differ.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_left_padded_batch_matches_dense(family):
    model = tiny_model(family)
    lengths = [83, 40, 9]
    ids = prompt(batch=3, length=83)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : 83 - length] = 0
        mask[row, 83 - length:] = 1
    dense = teacher_forced_logits(model, ids, DynamicCache(config=model.config), steps=10, attention_mask=mask)
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET, dense_layers=1)) as session:
        cache = session.new_cache()
        pipelined = teacher_forced_logits(model, ids, cache, steps=10, attention_mask=mask)
    assert cache.layers[1].seq_lens_host.tolist() == [length + 10 for length in lengths]
    torch.testing.assert_close(pipelined, dense, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)

    with torch.no_grad():
        dense_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)):
            pipelined_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(pipelined_tokens, dense_tokens)


def test_left_padded_small_budget_selects_within_each_row():
    model = tiny_model("qwen3")
    ids = prompt(batch=2, length=120)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    config = hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=0)
    with hf.enable(model, config) as session:
        cache = session.new_cache()
        teacher_forced_logits(model, ids, cache, steps=3, attention_mask=mask)
    layer = cache.layers[0]
    assert layer.seq_lens_host.tolist() == [123, 53]
    last_pages = [(123 - 1) // PAGE, (53 - 1) // PAGE]
    assert layer.last_selection[0, :, -1].tolist() == [last_pages[0]] * 2
    assert layer.last_selection[1, :, -1].tolist() == [last_pages[1]] * 2
    assert layer.attended_tokens().tolist() == [[2 * PAGE + 123 - 15 * PAGE] * 2, [2 * PAGE + 53 - 6 * PAGE] * 2]


def test_enable_and_exit_restore_bit_identical_outputs():
    model = tiny_model("mistral")
    ids = prompt()
    with torch.no_grad():
        before = model(ids).logits
        with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=2 * PAGE)):
            assert model.config._attn_implementation == "memops"
            assert "memops" in AttentionInterface._global_mapping
            model.generate(ids, max_new_tokens=4, do_sample=False)
        after = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    assert "memops" not in AttentionInterface._global_mapping
    assert "memops" not in AttentionMaskInterface._global_mapping
    assert "_prepare_cache_for_generation" not in model.__dict__ and "generate" not in model.__dict__
    assert torch.equal(before, after)


def test_generate_releases_its_cache_when_it_returns():
    """The session forgets the cache of a finished generate() call: nothing but the caller keeps it."""
    import gc
    import weakref

    model = tiny_model("llama")
    ids = prompt()
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=2 * PAGE)) as session:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = weakref.ref(getattr(out, "cache", None) or out.past_key_values)
        assert type(cache()).__name__ == "MemopsCache" and session.active_cache is None
        del out
        gc.collect()
        assert cache() is None
        # A manual loop sets it again for its forward.
        manual = session.new_cache()
        with torch.no_grad():
            model(ids, use_cache=True, **{hf.cache_argument(model): manual})
        assert session.active_cache is manual


def test_exit_restores_after_an_exception():
    model = tiny_model("llama", attn_implementation="eager")
    with pytest.raises(KeyError):
        with hf.enable(model):
            raise KeyError("inside")
    assert model.config._attn_implementation == "eager"
    assert "_prepare_cache_for_generation" not in model.__dict__


def test_enable_twice_on_one_model_raises():
    model = tiny_model("llama")
    with hf.enable(model):
        with pytest.raises(RuntimeError, match="already inside"):
            with hf.enable(model):
                pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="topk"), "method"),
        (dict(page_size=0), "page_size"),
        (dict(token_budget=10**12), r"token_budget must be an int in \[1, 2147483647\]"),
        (dict(page_size=2**31), r"page_size must be an int in \[1, 2147483647\]"),
        (dict(token_budget=16, page_size=16, sink_pages=1, recent_pages=1), r"token_budget \(16\) is smaller"),
        (dict(recent_pages=0), "recent_pages"),
        (dict(sink_pages=-1), "sink_pages"),
        (dict(dense_layers=1.5), "dense_layers"),
        (dict(group_reduce="mean"), "group_reduce"),
        (dict(placement={"score": "cpu"}), "unknown step 'score'"),
        (dict(placement={"relevancy": "tpu"}), r"placement\['relevancy'\]"),
        (dict(placement={"apply": "fpga"}), r"placement\['apply'\] cannot be 'fpga'"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf.MemopsConfig(**kwargs)


@pytest.mark.parametrize(
    "family, overrides, match",
    [
        ("mistral", {"sliding_window": 32}, "sliding-window"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0}, "sliding-window"),
    ],
)
def test_unsupported_variants_are_refused(family, overrides, match):
    model = tiny_model(family, **overrides)
    with pytest.raises(ValueError, match=match):
        with hf.enable(model):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_soft_capping_model_is_refused():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="model_type 'gemma2' is not supported"):
        with hf.enable(model):
            pass


def test_unavailable_device_placement_raises_at_first_use():
    model = tiny_model("llama")
    placement_kind = "fpga" if not hf.fpga_available() else ("cuda" if not torch.cuda.is_available() else None)
    if placement_kind is None:
        pytest.skip("both the FPGA device and CUDA are available: no unavailable device to name")
    config = hf.MemopsConfig(page_size=PAGE, placement={"relevancy": placement_kind})
    with hf.enable(model, config):
        with pytest.raises(RuntimeError, match=f"placement names '{placement_kind}'"):
            model.generate(prompt(), max_new_tokens=2)


def _placement_matches_dense(placement):
    model = tiny_model("llama")
    ids = prompt()
    dense = teacher_forced_logits(model, ids, DynamicCache(config=model.config), steps=6)
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET, placement=placement)) as session:
        cache = session.new_cache()
        pipelined = teacher_forced_logits(model, ids, cache, steps=6)
    torch.testing.assert_close(pipelined, dense, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    return cache


def test_fpga_placement_matches_dense():
    if not hf.fpga_available():
        pytest.skip("torch_memops.fpga is not importable or torch.device('fpga') is not registered")
    cache = _placement_matches_dense({"prepare": "fpga", "relevancy": "fpga", "retrieval": "cpu", "apply": "cpu"})
    assert cache.layers[2].last_selection.device.type == "fpga"


def test_fpga_memory_with_cpu_apply_matches_dense():
    if not hf.fpga_available():
        pytest.skip("torch_memops.fpga is not importable or torch.device('fpga') is not registered")
    cache = _placement_matches_dense({"prepare": "fpga", "relevancy": "fpga", "retrieval": "fpga", "apply": "cpu"})
    assert cache.layers[2].keys.device.type == "fpga"
    # Each layer's buffers in its own HBM bank (one bank of 512 MiB does not hold a model's KV;
    # the H200 planner run at 8K overfilled bank 0): keys, values and summaries alike.
    from torch_memops import fpga

    banks = []
    sparse = [layer for layer in cache.layers if layer.sparse]
    for layer in sparse:
        storage = layer.storage
        owned = [t for t in (storage.keys, storage.values, storage.summary) if t is not None]
        assert all(t.device.type == "fpga" for t in owned)
        assert {fpga.bank_of(t) for t in owned} == {layer.layer_idx % fpga.HBM_BANKS}
        banks.append(fpga.bank_of(storage.keys))
    assert len(set(banks)) == len(sparse) > 1
    assert fpga.default_bank() == 0, "the default bank is restored"


def test_cuda_placement_matches_dense():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cache = _placement_matches_dense({"prepare": "cpu", "relevancy": "cpu", "retrieval": "cuda", "apply": "cpu"})
    assert cache.layers[2].keys.device.type == "cuda"
