"""MemopsConfig(offload="host_gather"): keys/values of the sparse layers in host memory, selected pages
gathered on the host and copied to the model's device (torch_memops/hf/offload.py).

On a CPU-only machine the model's device is the CPU: the offloaded path runs with plain copies
(no stream, no event, no pinned memory) and is compared token for token with the pipeline that
keeps every step on one device. Where CUDA exists the same tests also run with the model on the
GPU (pinned host buffers, side stream).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_memops import hf, ops  # noqa: E402
from torch_memops.hf import offload as offload_module  # noqa: E402
from torch_memops.hf import storage as storage_module  # noqa: E402

VOCAB = 97
PAGE = 8
BUDGET = 32  # 4 pages of the ~11 of each row: the selection matters
PROMPT = 90
PAD = 27  # row 1 is left padded by this many tokens
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_llama(device="cpu", dtype=torch.float32):
    # initializer_range 0.3: the random model's greedy tokens vary (at 0.02 they repeat one token).
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=1024, attn_implementation="sdpa",
                                      initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model


def padded_batch(device="cpu"):
    ids = torch.randint(1, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids.to(device), mask.to(device)


def config(offload=None, **kwargs):
    kwargs = {"page_size": PAGE, "token_budget": BUDGET, "dense_layers": 1, **kwargs}
    return hf.MemopsConfig(offload=offload, **kwargs)


def generate(model, memops, new_tokens=20, **kwargs):
    ids, mask = padded_batch(model.device)
    with hf.enable(model, memops):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, PROMPT:]


def teacher_forced(model, memops, steps=14):
    """Prefill of the padded batch, then `steps` decode steps on fixed tokens; (logits, cache)."""
    ids, mask = padded_batch(model.device)
    forced = torch.randint(1, VOCAB, (2, steps), generator=torch.Generator().manual_seed(7)).to(model.device)
    with hf.enable(model, memops) as session, torch.no_grad():
        cache = session.new_cache()
        kwargs = {hf.cache_argument(model): cache}
        logits = [model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs).logits[:, -1]]
        selections = []
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            out = model(input_ids=forced[:, step:step + 1], attention_mask=mask, use_cache=True, **kwargs)
            logits.append(out.logits[:, -1])
            selections.append([layer.last_selection.cpu() for layer in cache.layers if layer.sparse])
    return torch.stack(logits, dim=1), selections, cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["quest", "mean", "quest_int8", "quest_head"])
def test_generate_gives_the_tokens_of_the_one_device_pipeline(method, device):
    model = tiny_llama(device)
    on_device = generate(model, config(method=method))
    offloaded = generate(model, config("host_gather", method=method))
    assert torch.equal(offloaded, on_device)
    if method == "quest":
        # The budget matters: attending every page gives other tokens, so equality above is not vacuous.
        assert not torch.equal(generate(model, config(token_budget=4096)), on_device)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_selected_pages_match_every_step(device):
    model = tiny_llama(device)
    reference_logits, reference_pages, _ = teacher_forced(model, config())
    logits, pages, _ = teacher_forced(model, config("host_gather"))
    # The same pages every step and layer; the attention over them is summed in another order
    # (gathered prefix vs in place), so logits agree to float32 rounding, amplified by 4 layers.
    assert len(pages) == len(reference_pages) == 14
    for step_pages, step_reference in zip(pages, reference_pages):
        assert len(step_pages) == len(step_reference) == 3
        for a, b in zip(step_pages, step_reference):
            assert torch.equal(a, b)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_live_where_the_offload_says(device):
    model = tiny_llama(device)
    _, _, cache = teacher_forced(model, config("host_gather"), steps=2)
    can_pin = model.device.type == "cuda" and torch.cuda.is_available()
    for layer in cache.layers:
        storage = layer.storage
        if not layer.sparse:  # the dense leading layer stays on the model's device
            assert not isinstance(storage, offload_module.HostLayerStorage)
            assert storage.keys.device == model.device and storage.values.device == model.device
            continue
        assert isinstance(storage, offload_module.HostLayerStorage)
        assert storage.keys.device.type == "cpu" and storage.values.device.type == "cpu"
        assert storage.pinned == can_pin
        assert storage.keys.is_pinned() == can_pin and storage.values.is_pinned() == can_pin
        assert storage.summary.device == model.device and storage.tail.device == model.device
        # Past the written tokens the host buffers are zeros: gathered padding is masked by Apply,
        # and must be finite (0 * NaN would not be).
        assert storage.capacity % PAGE == 0 and storage.capacity > storage.max_len
        assert not storage.keys[:, :, storage.max_len:].any() and not storage.values[:, :, storage.max_len:].any()
        assert storage.prepare_keys is None and storage.relevancy_summary is None  # no key mirror on the device
        assert layer.transfer is cache.layers[-1].transfer  # one staging pair for the cache


@pytest.mark.parametrize("device", DEVICES)
def test_decode_tokens_reach_the_host_buffers_and_the_summary(device):
    model = tiny_llama(device)
    steps = 14
    _, _, reference = teacher_forced(model, config(), steps=steps)
    _, _, cache = teacher_forced(model, config("host_gather"), steps=steps)
    for ref_layer, layer in zip(reference.layers, cache.layers):
        if not layer.sparse:
            continue
        storage = layer.storage
        lens = storage.host_lens
        assert lens.tolist() == [PROMPT + steps, PROMPT - PAD + steps]
        host_keys, host_values = layer.keys, layer.values  # flushes the last token
        for b, n in enumerate(lens.tolist()):
            torch.testing.assert_close(host_keys[b, :, :n], ref_layer.keys[b, :, :n].cpu(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(host_values[b, :, :n], ref_layer.values[b, :, :n].cpu(), atol=1e-5,
                                       rtol=1e-5)
        # The device summary, kept current from the tail, equals Prepare Memory over the host keys.
        fresh = torch.zeros_like(storage.summary.cpu())
        ops.prepare_memory_(fresh, host_keys.contiguous(), PAGE, 0, mode="minmax", seq_lens=lens)
        for b, n in enumerate(lens.tolist()):
            pages = -(-n // PAGE)
            assert torch.equal(storage.summary[b, :, :pages].cpu(), fresh[b, :, :pages])
            last = (pages - 1) * PAGE
            assert torch.equal(storage.tail[b, :, :n - last].cpu(), host_keys[b, :, last:n])


def test_host_buffers_grow(monkeypatch):
    monkeypatch.setattr(offload_module, "GROWTH_TOKENS", 3)
    monkeypatch.setattr(storage_module, "GROWTH_TOKENS", 3)
    model = tiny_llama()
    on_device = generate(model, config(), new_tokens=24)
    with hf.enable(model, config("host_gather")) as session:
        cache = session.new_cache()
        ids, mask = padded_batch()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, **{hf.cache_argument(model): cache})
    assert torch.equal(out[:, PROMPT:], on_device)
    storage = cache.layers[-1].storage
    assert storage.capacity > PROMPT + 3 + PAGE and storage.capacity % PAGE == 0  # grew, in whole pages


def test_beam_search_reorders_the_host_rows():
    model = tiny_llama()
    assert torch.equal(generate(model, config("host_gather"), new_tokens=10, num_beams=2),
                       generate(model, config(), new_tokens=10, num_beams=2))


def test_static_and_compiled_use_is_refused():
    model = tiny_llama()
    with hf.enable(model, config("host_gather")) as session:
        with pytest.raises(ValueError, match=r"offload='host_gather'\) runs on the dynamic MemopsCache only.*max_cache_len=64"):
            session.new_cache(max_cache_len=64)
        ids, mask = padded_batch()
        with pytest.raises(ValueError, match="dynamic MemopsCache only"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("kwargs,match", [
    (dict(offload="disk"), r"MemopsConfig.offload must be one of \(None, 'host', 'host_gather'\), got 'disk'"),
    (dict(offload="host", placement={"retrieval": "cpu"}), r"sets the placement itself.*'retrieval': 'cpu'"),
    (dict(offload="host", method="dense"), r"needs a method with a page summary .*; method .dense. has none"),
    (dict(offload="host", method="streaming"), "method 'streaming' has none"),
    (dict(offload="host", pin_memory=1), "pin_memory must be a bool, got 1"),
])
def test_bad_offload_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf.MemopsConfig(page_size=PAGE, token_budget=BUDGET, **kwargs)


@pytest.mark.parametrize("heads", [2, 6])  # one selection per kv head, and per query head (GQA 3)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_gather_is_gather_retrieve(heads, dtype):
    B, Hkv, P, D, k = 3, 2, 8, 16, 5
    lens = torch.tensor([37, 8, 61], dtype=torch.int32)
    capacity = 64
    keys = torch.randn(B, Hkv, capacity, D).to(dtype)
    values = torch.randn(B, Hkv, capacity, D).to(dtype)
    indices = torch.full((B, heads, k), -1, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        pages = -(-n // P)
        for h in range(heads):
            take = min(k, pages)
            chosen = torch.cat([torch.randperm(pages - 1)[:take - 1], torch.tensor([pages - 1])]).sort().values
            indices[b, h, :take] = chosen.int()
    transfer = offload_module.HostTransfer(pieces_per_tensor=3, threads=1)
    threads = torch.get_num_threads()
    rows = offload_module.host_page_rows(indices, Hkv, capacity // P)
    slot = transfer.gather(keys.view(-1, P * D), values.view(-1, P * D), rows, torch.device("cpu"), False)
    assert torch.get_num_threads() == threads  # the gather's thread count is restored
    gathered_k = slot["dev_k"].view(B, heads, k * P, D)
    gathered_v = slot["dev_v"].view(B, heads, k * P, D)
    expand = heads // Hkv
    want_k, lengths = ops.gather_retrieve(keys.repeat_interleave(expand, 1), indices, P, seq_lens=lens)
    want_v, _ = ops.gather_retrieve(values.repeat_interleave(expand, 1), indices, P, seq_lens=lens)
    for b in range(B):
        for h in range(heads):
            n = int(lengths[b, h])
            assert torch.equal(gathered_k[b, h, :n], want_k[b, h, :n])
            assert torch.equal(gathered_v[b, h, :n], want_v[b, h, :n])
    with pytest.raises(ValueError, match="threads must be None .* or >= 1, got 0"):
        offload_module.HostTransfer(threads=0)
    with pytest.raises(ValueError, match="4 heads, not a multiple of the 3 kv heads"):
        offload_module.host_page_rows(torch.zeros(1, 4, 2, dtype=torch.int32), 3, 8)


def test_profile_sees_every_step_of_an_offloaded_decode():
    model = tiny_llama()
    profile = hf.StepProfile()
    with hf.enable(model, config("host_gather")) as session:
        session.profile = profile
        ids, mask = padded_batch()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    decode_steps = {name for (phase, name) in profile.seconds if phase == "decode"}
    assert decode_steps == {"prepare", "relevancy", "retrieval", "apply", "dense"}


@pytest.mark.parametrize("per_row", [False, True])  # True: the path a CUDA prefill takes
def test_prefix_write_lands_in_the_strided_host_buffer(per_row):
    host = torch.full((2, 3, 40, 4), float("nan"))
    states = torch.randn(2, 3, 11, 4)
    offload_module._write_prefix(host, states, 5, per_row=per_row)
    assert torch.equal(host[:, :, 5:16], states)
    assert host[:, :, :5].isnan().all() and host[:, :, 16:].isnan().all()


class _FakeCuda:
    """Stand-ins for torch.cuda's Event/Stream that log what the transfer asks of them, so that the
    CUDA branch of HostTransfer (pieces, slots, event order) runs on the CPU."""

    def __init__(self):
        self.log = []
        fake = self

        class Event:
            def record(self, stream):
                fake.log.append(("record", stream.name))

            def synchronize(self):
                fake.log.append(("synchronize",))

        class Stream:
            def __init__(self, device=None, name="side"):
                self.device, self.name = device, name

            def wait_event(self, event):
                fake.log.append(("wait", self.name))

        self.Event, self.Stream = Event, Stream
        self.compute = Stream(name="compute")

    def install(self, monkeypatch):
        import contextlib

        monkeypatch.setattr(offload_module.HostTransfer, "_cuda", lambda self, device: True)
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)


def test_transfer_cuda_branch_orders_its_copies(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    B, H, P, D, k, capacity = 2, 2, 4, 8, 3, 32
    keys, values = torch.randn(B, H, capacity, D), torch.randn(B, H, capacity, D)
    transfer = offload_module.HostTransfer(pieces_per_tensor=2)
    device = torch.device("cpu")
    outs = []
    for layer in range(3):  # slots 0, 1, 0: the third reuses the first
        indices = torch.stack([torch.randperm(capacity // P)[:k].sort().values for _ in range(B * H)]).view(B, H, k)
        host_indices = transfer.indices_to_host(indices.int(), pinned=False)
        assert torch.equal(host_indices, indices.int())
        rows = offload_module.host_page_rows(host_indices, H, capacity // P)
        fake.log.clear()
        slot = transfer.gather(keys.view(-1, P * D), values.view(-1, P * D), rows, device, False)
        want = keys.view(B * H * (capacity // P), P * D)[rows]
        assert torch.equal(slot["dev_k"], want) and slot["dev_k"].data_ptr() != slot["host_k"].data_ptr()
        assert torch.equal(slot["dev_v"], values.view(-1, P * D)[rows])
        transfer.consumed(slot, device)
        outs.append(slot)
        if layer < 2:  # a fresh slot: nothing to wait for before the copies
            # copies done -> compute waits for them; Apply done (consumed) recorded on compute
            assert fake.log == [("record", "side"), ("wait", "compute"), ("record", "compute")]
        else:  # the reused slot: the host waits for its last copy, the side stream for its last Apply
            assert fake.log == [("synchronize",), ("wait", "side"), ("record", "side"), ("wait", "compute"),
                                ("record", "compute")]
    assert outs[0] is outs[2] and outs[0] is not outs[1]


def test_each_decode_step_waits_once_per_layer_after_relevancy(monkeypatch):
    """The host waits for the device in one place per sparse layer and step: the indices' copy. The
    new token's write to the host happens after it (never in update, which would add a wait)."""
    log = []
    to_host = offload_module.HostTransfer.indices_to_host
    flush = offload_module.HostLayerStorage.flush

    def logged_to_host(self, indices, pinned):
        log.append("indices")
        return to_host(self, indices, pinned)

    def logged_flush(self):
        if self._pending is not None:
            log.append("token")
        return flush(self)

    monkeypatch.setattr(offload_module.HostTransfer, "indices_to_host", logged_to_host)
    monkeypatch.setattr(offload_module.HostLayerStorage, "flush", logged_flush)
    teacher_forced(tiny_llama(), config("host_gather"), steps=3)
    # 3 decode steps x 3 sparse layers; the prefill waits for nothing.
    assert log == ["indices", "token"] * 9
