"""The static, compileable MemopsCache (CPU): same tokens as the dynamic cache and the stock model,
a decode step that compiles with fullgraph=True, and no host synchronisation in a decode step."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from host_sync import HostSyncError, forbid_host_sync  # noqa: E402
from test_hf import FULL_BUDGET, PAGE, prompt, tiny_model  # noqa: E402

from torch_memops import hf  # noqa: E402
from torch_memops.hf.rows import put_at_rows  # noqa: E402

# aot_eager runs Dynamo (graph breaks, guards), AOT autograd and functionalization over the ops'
# fake kernels, which is what can fail in our code; inductor adds code generation for the dense
# layers only and takes ~80 s on a 2-core CPU (tools/gpu_hf.sh compiles with inductor on the GPU).
BACKEND = "aot_eager"


def left_padded(batch_lengths, length):
    ids = prompt(batch=len(batch_lengths), length=length)
    mask = torch.ones_like(ids)
    for row, valid in enumerate(batch_lengths):
        ids[row, :length - valid] = 0
        mask[row, :length - valid] = 0
    return ids, mask


def greedy_loop(model, cache, input_ids, steps, forward=None, attention_mask=None):
    """Prefill eagerly, then `steps` greedy one-token forwards through `forward` (default: eager)."""
    forward = forward or model.forward
    arg = hf.cache_argument(model)
    mask = attention_mask
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **{arg: cache})
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = forward(input_ids=tokens[-1], attention_mask=mask, use_cache=True, **{arg: cache})
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(num_beams=3, do_sample=False),
                                    dict(do_sample=True, top_k=0)], ids=["greedy", "beam", "sample"])
def test_static_dynamic_and_stock_generate_agree_at_full_budget(family, kwargs):
    model = tiny_model(family)
    ids, mask = left_padded([50, 31, 9], 50)
    config = hf.MemopsConfig(page_size=PAGE, token_budget=FULL_BUDGET)
    results = {}
    with torch.no_grad():
        for name in ("stock", "dynamic", "static"):
            torch.manual_seed(5)
            static = dict(cache_implementation="static") if name == "static" else {}
            if name == "stock":
                results[name] = model.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs)
                continue
            with hf.enable(model, config):
                out = model.generate(ids, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True,
                                     **kwargs, **static)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            assert type(cache).__name__ == "MemopsCache"
            assert cache.is_compileable == (name == "static")
            results[name] = out.sequences
    assert torch.equal(results["dynamic"], results["stock"])
    assert torch.equal(results["static"], results["stock"])


def test_static_cache_keeps_fixed_buffers_and_device_lengths():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 17], 40)
    with hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=1)) as session:
        cache = session.new_cache(max_cache_len=64)
        greedy_loop(model, cache, ids, steps=1, attention_mask=mask)
        layer = cache.layers[2]
        pointers = [t.data_ptr() for t in layer.storage.buffers()]
        assert layer.keys.shape == (2, 2, 64, 16), "a static layer attends over its whole capacity"
        assert layer.storage.summary.shape == (2, 2, 8, 2, 16)
        greedy_loop_tail = greedy_loop(model, cache, ids[:, -1:], steps=0)  # one more decode step
        assert greedy_loop_tail.shape == (2, 1)
        assert [t.data_ptr() for t in layer.storage.buffers()] == pointers, "no reallocation"
        assert layer.seq_lens_host.tolist() == [42, 19]
        assert int(layer.get_seq_length()) == 42, "transformers sees the padded length"
    with pytest.raises(ValueError, match="max_cache_len=64 tokens; the prefill has 70"):
        with hf.enable(model) as session:
            greedy_loop(model, session.new_cache(max_cache_len=64), prompt(length=70), steps=0)


@pytest.mark.parametrize("method", ["quest", "mean", "dense"])
def test_compiled_decode_step_has_no_graph_break_and_gives_eager_tokens(method):
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = prompt(length=45)
    config = hf.MemopsConfig(method=method, page_size=PAGE, token_budget=3 * PAGE, dense_layers=1)
    with hf.enable(model, config) as session:
        eager = greedy_loop(model, session.new_cache(max_cache_len=72), ids, steps=6)
        dynamic = greedy_loop(model, session.new_cache(), ids, steps=6)
        compiled_forward = torch.compile(model.forward, fullgraph=True, backend=BACKEND)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = greedy_loop(model, session.new_cache(max_cache_len=72), ids, steps=6, forward=compiled_forward)
    assert torch.equal(eager, dynamic), "static and dynamic caches select the same pages"
    assert torch.equal(compiled, eager)


def test_generate_auto_compiles_decode_with_the_static_cache():
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = prompt(length=45)
    compile_config = transformers.CompileConfig(fullgraph=True, backend=BACKEND)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    config = hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=1)
    with torch.no_grad(), hf.enable(model, config):
        eager = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                               disable_compile=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                                      compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate() took its compiled path"
    assert torch.equal(compiled, eager)


def _decode_ready(model, cache, ids, mask=None):
    greedy_loop(model, cache, ids, steps=1, attention_mask=mask)
    return prompt(batch=ids.shape[0], length=1, seed=9)


def test_static_decode_step_makes_no_host_sync():
    model = tiny_model("llama")
    ids, mask = left_padded([45, 20], 45)
    arg = hf.cache_argument(model)
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE)) as session:
        cache = session.new_cache(max_cache_len=64)
        token = _decode_ready(model, cache, ids, mask)
        mask = torch.ones(2, 47, dtype=torch.long)
        mask[1, :25] = 0
        with forbid_host_sync() as ops:
            model(input_ids=token, attention_mask=mask, use_cache=True, **{arg: cache})
    # Each sparse layer's Relevancy + top-k + Apply is one topk_sparse_apply; the dense layers attend.
    assert ops.count("memops::topk_sparse_apply") == 2, "the two sparse layers selected pages under the check"
    assert ops.count("memops::sparse_apply") == 2


def test_dynamic_decode_step_on_equal_rows_makes_no_host_sync():
    """The dynamic cache keeps its bookkeeping in host ints: no device read in its decode step either."""
    model = tiny_model("llama")
    arg = hf.cache_argument(model)
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE)) as session:
        cache = session.new_cache()
        token = _decode_ready(model, cache, prompt(length=45))
        with forbid_host_sync() as ops:
            model(input_ids=token, use_cache=True, **{arg: cache})
    assert ops.count("memops::prepare_memory_") == 2 and ops.count("memops::topk_sparse_apply") == 2


def test_the_host_sync_check_catches_a_scalar_read():
    """The check is not vacuous: one .item() added to the decode path makes it fail."""
    model = tiny_model("llama")
    ids = prompt(length=45)
    arg = hf.cache_argument(model)
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE)) as session:
        cache = session.new_cache(max_cache_len=64)
        token = _decode_ready(model, cache, ids)
        layer = cache.layers[3]
        original = layer.decode_attention

        def decode_with_a_read(query, scale):
            layer.seq_lens_on(query.device).max().item()
            return original(query, scale)

        layer.decode_attention = decode_with_a_read
        with pytest.raises(HostSyncError, match="Tensor.item"):
            with forbid_host_sync():
                model(input_ids=token, use_cache=True, **{arg: cache})
        for method in ("tolist", "cpu"):
            with pytest.raises(HostSyncError, match=f"Tensor.{method}"):
                with forbid_host_sync():
                    getattr(torch.arange(3), method)()
        # A fill value made with new_tensor (a host-to-device copy on a GPU; it was in the
        # summary refresh and only the GPU's sync debug mode saw it).
        with pytest.raises(HostSyncError, match="Tensor.new_tensor"):
            with forbid_host_sync():
                torch.arange(3.0).new_tensor(float("inf"))
        with pytest.raises(HostSyncError, match="Tensor.tensor"):
            with forbid_host_sync():
                torch.tensor([1.0])
        with pytest.raises(HostSyncError, match="boolean mask"):
            with forbid_host_sync():
                torch.arange(3)[torch.arange(3) > 0]


def test_static_cache_refuses_what_it_cannot_hold():
    model = tiny_model("llama")
    with hf.enable(model) as session:
        with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
            session.new_cache(max_cache_len=0)
    config = hf.MemopsConfig(page_size=PAGE, placement={"relevancy": "fpga" if hf.fpga_available() else "cpu",
                                                        "retrieval": "cpu"})
    if not hf.fpga_available():
        pytest.skip("needs a second device (the FPGA emulation) to place a step elsewhere")
    with hf.enable(model, config) as session:
        with pytest.raises(ValueError, match="keeps every step on one device"):
            greedy_loop(model, session.new_cache(max_cache_len=128), prompt(length=20), steps=0)


def _scatter_write(buffer, positions, values):
    batch, heads = buffer.shape[:2]
    index = positions.long().view(batch, 1, 1, 1).expand(batch, heads, 1, buffer.shape[3])
    buffer.scatter_(2, index, values[:, :, None])


@pytest.mark.parametrize("write, in_place", [(put_at_rows, True), (_scatter_write, False)])
def test_compiled_row_write_stays_in_place(write, in_place):
    """The decode write that inductor keeps in place (index_put_): its generated code touches the
    written elements only. The scatter_ control shows the check sees a whole-buffer copy (on an
    H200 that copy was 28 ms of a 45 ms token at batch 8, 32K)."""
    from torch._inductor.utils import run_and_get_code

    buffer = torch.zeros(2, 3, 4096, 64)
    torch._dynamo.mark_static_address(buffer)
    positions, values = torch.tensor([5, 4000], dtype=torch.int32), torch.randn(2, 3, 64)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(write, fullgraph=True), buffer, positions, values)
    torch._dynamo.reset()
    assert torch.equal(buffer[0, :, 5], values[0]) and torch.equal(buffer[1, :, 4000], values[1])
    assert int((buffer != 0).sum()) == values.numel()
    whole_buffer_loop = str(buffer.numel()) in "\n".join(code)
    assert whole_buffer_loop is not in_place


def _forced_step(model, cache, token, mask):
    arg = hf.cache_argument(model)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=token, attention_mask=mask, use_cache=True, **{arg: cache}).logits[:, -1]
    return logits, mask


def test_static_crop_forgets_the_newest_token_exactly():
    """What transformers' deferred stop check needs: a step run past the end, then crop(-1), leaves
    the cache as if that step had never run. Rows of 45 and 20 tokens + 3: the dropped token opens a
    new page in row 0 (position 48) and sits mid-page in row 1 (position 23)."""
    model = tiny_model("llama")
    ids, mask = left_padded([45, 20], 45)
    forced = prompt(batch=2, length=5, seed=11)
    config = hf.MemopsConfig(page_size=PAGE, token_budget=3 * PAGE, dense_layers=1)
    with torch.no_grad(), hf.enable(model, config) as session:
        runs = []
        for extra in (False, True):
            cache = session.new_cache(max_cache_len=72)
            arg = hf.cache_argument(model)
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{arg: cache})
            step_mask = mask
            for t in range(3):
                _, step_mask = _forced_step(model, cache, forced[:, t:t + 1], step_mask)
            if extra:
                _forced_step(model, cache, forced[:, 4:5], step_mask)
                assert cache.is_croppable
                cache.crop(0)  # what the deferred check calls every step: nothing changes
                assert cache.layers[1].seq_lens_host.tolist() == [49, 24]
                cache.crop(-1)
            lens = [layer.seq_lens_host.tolist() for layer in cache.layers]
            seen = int(cache.get_seq_length())
            logits, _ = _forced_step(model, cache, forced[:, 3:4], step_mask)
            runs.append((lens, seen, logits))
    (lens_a, seen_a, logits_a), (lens_b, seen_b, logits_b) = runs
    assert lens_a == lens_b and lens_a[1] == [48, 23] and seen_a == seen_b == 48
    assert torch.equal(logits_a, logits_b), "the step after the crop computes what it would have without the extra step"


def test_crop_refuses_what_it_cannot_undo():
    model = tiny_model("llama")
    with torch.no_grad(), hf.enable(model, hf.MemopsConfig(page_size=PAGE)) as session:
        dynamic = session.new_cache()
        greedy_loop(model, dynamic, prompt(length=20), steps=1)
        assert not dynamic.is_croppable
        dynamic.crop(0)
        with pytest.raises(NotImplementedError, match="only the static cache"):
            dynamic.crop(-1)
        static = session.new_cache(max_cache_len=32)
        greedy_loop(model, static, prompt(length=20), steps=1)
        with pytest.raises(NotImplementedError, match="as a negative int"):
            static.crop(5)
        with pytest.raises(TypeError, match="tokens_to_remove must be an int"):
            static.crop(-1.0)


def test_deferred_stop_check_is_allowed_for_this_sessions_caches_only():
    """enable() lets transformers' DeferredStopCheck run on CUDA for its own caches, by
    transformers' rule for the cache (croppable, or not returned); every other case keeps
    transformers' answer, and leaving the context restores it."""
    from transformers.generation.utils import DeferredStopCheck

    original = DeferredStopCheck.is_supported
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    stock = transformers.StaticCache(config=tiny_model("llama").config, max_cache_len=16)
    model = tiny_model("llama")
    with hf.enable(model) as session:
        static, dynamic = session.new_cache(max_cache_len=32), session.new_cache()
        supported = DeferredStopCheck.is_supported
        assert supported(cuda, static, True, is_assistant=False)
        assert supported(cuda, dynamic, False, is_assistant=False)
        assert not supported(cuda, dynamic, True, is_assistant=False), "a returned dynamic cache cannot be undone"
        assert not supported(cuda, static, True, is_assistant=True)
        assert not supported(cpu, static, True, is_assistant=False), "no CPU events: transformers' answer"
        assert supported(cuda, stock, False, is_assistant=False) == original(cuda, stock, False, is_assistant=False)
        with hf.enable(tiny_model("llama"), hf.MemopsConfig(defer_stop_check=False)) as other:
            assert not supported(cuda, other.new_cache(max_cache_len=32), True, is_assistant=False)
        assert supported(cuda, static, True, is_assistant=False), "the inner context left the outer one's rule"
    assert DeferredStopCheck.is_supported is original
    assert not DeferredStopCheck.is_supported(cuda, static, True, is_assistant=False)
    with pytest.raises(ValueError, match="defer_stop_check must be a bool"):
        hf.MemopsConfig(defer_stop_check=1)
