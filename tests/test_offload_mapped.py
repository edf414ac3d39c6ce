"""MemopsConfig(offload="host"): keys/values of the sparse layers in pinned host memory that the GPU
reads in place (torch_memops/hf/mapped.py).

With the model on the CPU there is nothing to map: the buffers are host tensors and the tokens
must be those of the plain pipeline. Where CUDA exists the same tests run with the model on the
GPU, where the buffers are CUDA aliases of pinned host memory: same tokens as the all-GPU
pipeline (dynamic, static and compiled), the keys and values in host memory (not in any block
of the caching allocator), the host tensors holding every token written.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_memops import hf  # noqa: E402
from torch_memops.hf import mapped as mapped_module  # noqa: E402

from test_offload import PROMPT, config, generate, padded_batch, teacher_forced, tiny_llama  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def in_caching_allocator(tensor) -> bool:
    """Whether ``tensor``'s memory is a block of torch's CUDA caching allocator (GPU memory)."""
    for segment in torch.cuda.memory_snapshot():
        if segment["address"] <= tensor.data_ptr() < segment["address"] + segment["total_size"]:
            return True
    return False


def sparse_storages(cache):
    return [layer.storage for layer in cache.layers if layer.sparse]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["quest", "quest_int8", "quest_head"])
def test_generate_gives_the_tokens_of_the_one_device_pipeline(method, device):
    model = tiny_llama(device)
    assert torch.equal(generate(model, config("host", method=method)), generate(model, config(method=method)))


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_forced_selections_and_logits_match(device):
    model = tiny_llama(device)
    logits, pages, cache = teacher_forced(model, config("host"))
    ref_logits, ref_pages, ref_cache = teacher_forced(model, config())
    for step, ref_step in zip(pages, ref_pages, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step, ref_step, strict=True))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for storage, ref in zip(sparse_storages(cache), sparse_storages(ref_cache)):
        assert isinstance(storage, mapped_module.MappedLayerStorage)
        lens = storage.host_lens
        assert torch.equal(lens, ref.host_lens)
        for b, n in enumerate(lens.tolist()):  # past a row's length the buffers hold no tokens
            assert torch.equal(storage.keys[b, :, :n], ref.keys[b, :, :n])
            assert torch.equal(storage.values[b, :, :n], ref.values[b, :, :n])
            pages = -(-n // 8)
            assert torch.equal(storage.summary[b, :, :pages], ref.summary[b, :, :pages])
        assert storage.summary.device == model.device  # the summary never leaves the model's device
        if device == "cpu":
            assert storage.keys.device.type == "cpu" and not storage.mapped
        else:
            assert storage.keys.device.type == "cuda" and storage.mapped
            assert not in_caching_allocator(storage.keys) and not in_caching_allocator(storage.values)
            assert in_caching_allocator(storage.summary)
    dense = [layer.storage for layer in cache.layers if not layer.sparse]
    if device == "cuda":
        assert all(in_caching_allocator(s.keys) for s in dense)  # dense layers stay on the GPU


@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_and_growth(device, monkeypatch):
    from torch_memops.hf import storage as storage_module

    model = tiny_llama(device)
    ids, mask = padded_batch(model.device)
    # Static: the buffers are allocated once, in host memory; the tokens are the dynamic path's.
    with hf.enable(model, config("host")):
        static = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                do_sample=False, cache_implementation="static")[:, PROMPT:]
    assert torch.equal(static, generate(model, config(), new_tokens=12))
    # Dynamic growth past the capacity keeps the buffers in (mapped) host memory.
    monkeypatch.setattr(storage_module, "GROWTH_TOKENS", 3)
    assert torch.equal(generate(model, config("host"), new_tokens=16), generate(model, config(), new_tokens=16))


def test_beam_search_keeps_rows_in_host_memory():
    model = tiny_llama()
    assert torch.equal(generate(model, config("host"), new_tokens=10, num_beams=2),
                       generate(model, config(), new_tokens=10, num_beams=2))


@cuda_only
def test_device_alias_is_the_pinned_buffer():
    host = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16).pin_memory()
    alias = mapped_module.device_alias(host, torch.device("cuda"))
    assert alias.device.type == "cuda" and alias.dtype == host.dtype and alias.shape == host.shape
    assert alias.data_ptr() == host.data_ptr()
    assert torch.equal(alias.cpu(), host)
    alias[1, 2:4] = 7  # a GPU write lands in host memory
    torch.cuda.synchronize()
    assert (host[1, 2:4] == 7).all()
    del host
    assert torch.equal(alias[0].cpu(), torch.arange(6, dtype=torch.float32).to(torch.bfloat16))  # kept alive


@cuda_only
def test_compiled_static_decode_matches_eager():
    model = tiny_llama("cuda")
    ids, mask = padded_batch(model.device)
    with hf.enable(model, config("host")):
        compiled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False, cache_implementation="static",
                                  compile_config=transformers.CompileConfig(fullgraph=True))[:, PROMPT:]
    assert torch.equal(compiled, generate(model, config("host"), new_tokens=8))


def test_device_alias_refuses_unpinned_memory():
    with pytest.raises(ValueError, match="pinned, contiguous"):
        mapped_module.device_alias(torch.zeros(4), torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a GPU model without pinned memory")
def test_pin_memory_false_is_fine_on_the_cpu():
    model = tiny_llama()
    assert torch.equal(generate(model, config("host", pin_memory=False), new_tokens=4),
                       generate(model, config(), new_tokens=4))


@cuda_only
def test_pin_memory_false_is_refused_on_the_gpu():
    model = tiny_llama("cuda")
    with pytest.raises(ValueError, match="needs page-locked memory"):
        generate(model, config("host", pin_memory=False), new_tokens=2)
