"""``MemopsConfig(offload="host_gather")``: the keys and values of the sparse layers in host memory,
only the selected pages copied to the model's device each decode step.

Per sparse layer the GPU keeps the page summary (``R / P`` of the keys: 1/4 of them for Quest's
min/max at ``P = 8``) and the keys of each row's newest page (``tail``, ``[B, Hkv, P, D]``), so
that Prepare Memory of a decode step and Relevancy never read host memory. The host keeps the
keys and values (pinned, so that copies are asynchronous). One decode step of a sparse layer:

1. ``update``: the new token's key goes into ``tail`` and the summary of its page is recomputed
   there (the method's own ``prepare_decode`` on the one-page tail); the new key and value are
   copied device -> host into a small pinned buffer (``non_blocking``), not waited for.
2. Relevancy on the device from the summary -> ``int32`` page indices ``[B, H, k]``, copied
   device -> host (``non_blocking``) and then waited for: the host cannot gather before it knows
   the pages. This wait is the one synchronisation of the step; it also covers step 1's copy,
   whose token the host then writes into its buffers (the newest page is always selected).
3. The host gathers the selected pages (``index_select`` into a pinned staging buffer, pages of
   ``P * D`` contiguous elements) in pieces: keys then values, each split in ``pieces_per_tensor``
   row ranges; each piece is copied host -> device on a side stream as soon as it is gathered,
   so the host gathers piece ``j + 1`` while piece ``j`` is in flight. Staging buffers come in
   two slots that alternate between consecutive sparse layers (the cache's layers share them);
   events order the reuse: the host does not overwrite a slot whose last copy has not finished,
   and the side stream does not overwrite a device slot that the previous Apply still reads.
4. Apply on the device (``sparse_apply`` over the gathered prefix) waits for the copy event.

What does not overlap: between 2 and the end of 3 the device has no work of this layer left (its
Apply needs the pages); the host's gather of the first piece is exposed, the later pieces overlap
the copies of the earlier ones. On a CPU-only machine every stream and event is absent and each
copy is a plain synchronous copy; the logic (host buffers, tail, gather, lengths) is the same.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from torch_memops import ops

from .methods import SelectionInputs
from .step_profile import NO_PROFILE
from .storage import GROWTH_TOKENS, LayerStorage, ceil_div

HOST = torch.device("cpu")


def _host_zeros(shape, dtype, pin: bool) -> Tensor:
    # Zeros, not empty: the gathered pages past a row's length are masked by Apply, but must be finite.
    return torch.zeros(shape, dtype=dtype, pin_memory=pin)


def _host_buffer(batch: int, heads: int, capacity: int, dim: int, dtype, pin: bool, filled: int) -> Tensor:
    """``[B, H, capacity, D]`` on the host, zero past token ``filled`` (the caller writes the rest)."""
    buffer = torch.empty((batch, heads, capacity, dim), dtype=dtype, pin_memory=pin)
    buffer[:, :, filled:].zero_()
    return buffer


def _host_like(tensor: Tensor, pin: bool) -> Tensor:
    """``tensor`` on the host, page-locked when ``pin`` (a host tensor that is not pinned is copied)."""
    tensor = tensor.to(HOST)
    return tensor.pin_memory() if pin and not tensor.is_pinned() else tensor


def _write_prefix(host: Tensor, states: Tensor, start: int, per_row: Optional[bool] = None) -> None:
    """``host[:, :, start:start + T] = states`` (``[B, H, T, D]``). From a CUDA tensor one copy per
    (row, head): each is contiguous on both sides, so it goes straight into the pinned buffer
    (a single copy of the strided slice would stage through pageable memory)."""
    end = start + states.shape[2]
    per_row = states.device.type == "cuda" if per_row is None else per_row
    if not per_row or not states.is_contiguous():
        host[:, :, start:end].copy_(states)
        return
    flat_host, flat_states = host.view(-1, *host.shape[2:]), states.view(-1, *states.shape[2:])
    for i in range(flat_states.shape[0]):
        flat_host[i, start:end].copy_(flat_states[i])


class HostLayerStorage(LayerStorage):
    """The buffers of one offloaded sparse layer: ``keys``/``values`` ``[B, Hkv, capacity, D]``
    on the host (capacity a multiple of ``page_size``), ``summary`` and ``tail`` on the compute
    (model) device, ``seq_lens`` on both. Dynamic only."""

    offloaded = True

    def __init__(self, *, method, page_size: int, compute_device: torch.device, key_states: Tensor,
                 value_states: Tensor, pin_memory: bool):
        self.method = method
        self.page_size = page_size
        self.sparse = True
        self.static = False
        self.has_summary = True
        self.memory_device = HOST
        self.compute_device = self.prepare_device = self.relevancy_device = compute_device
        self.pinned = bool(pin_memory and compute_device.type == "cuda" and torch.cuda.is_available())
        batch, heads, tokens, key_dim = key_states.shape
        capacity = ceil_div(tokens + GROWTH_TOKENS, page_size) * page_size
        # write_prefill fills the first `tokens` of every row next.
        self.keys = _host_buffer(batch, heads, capacity, key_dim, key_states.dtype, self.pinned, tokens)
        self.values = _host_buffer(batch, heads, capacity, value_states.shape[-1], value_states.dtype, self.pinned,
                                   tokens)
        self.summary = torch.zeros((batch, heads, capacity // page_size, method.representatives,
                                    method.summary_dim(key_dim, key_states.dtype)),
                                   dtype=key_states.dtype, device=compute_device)
        self.tail = torch.zeros((batch, heads, page_size, key_dim), dtype=key_states.dtype, device=compute_device)
        self.prepare_keys = self.relevancy_summary = None
        self.seq_lens = {}
        self._host_lens, self._host_steps = None, 0
        self.max_len = self.min_len = 0
        # The last decode token, on its way to the host: (keys, values, event, host positions).
        self._new_keys = self._new_values = None
        self._pending = None

    def buffers(self) -> List[Tensor]:
        return [self.keys, self.values, self.summary, self.tail]

    # -- the host side ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write the last decode token into the host buffers (waits for its device -> host copy)."""
        if self._pending is None:
            return
        event, positions, uniform = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if uniform is not None:
            self.keys[:, :, uniform:uniform + 1].copy_(self._new_keys)
            self.values[:, :, uniform:uniform + 1].copy_(self._new_values)
        else:
            rows = torch.arange(self.keys.shape[0])
            self.keys[rows, :, positions] = self._new_keys[:, :, 0]
            self.values[rows, :, positions] = self._new_values[:, :, 0]

    def key_view(self) -> Tensor:
        self.flush()
        return self.keys[:, :, :self.max_len]

    def value_view(self) -> Tensor:
        self.flush()
        return self.values[:, :, :self.max_len]

    def _on_device(self, start: int, end: int) -> Tensor:
        """Host keys ``[:, :, start:end]`` copied to the compute device (prefill-time only)."""
        self.flush()
        return self.keys[:, :, start:end].to(self.compute_device)

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self.flush()
        capacity = ceil_div(max(needed + GROWTH_TOKENS, 2 * self.capacity), self.page_size) * self.page_size
        used = self.max_len

        def grown(tensor: Tensor) -> Tensor:
            new = _host_buffer(*tensor.shape[:2], capacity, tensor.shape[3], tensor.dtype, self.pinned, used)
            new[:, :, :used].copy_(tensor[:, :, :used])
            return new

        self.keys, self.values = grown(self.keys), grown(self.values)
        summary = self.summary.new_zeros((*self.summary.shape[:2], capacity // self.page_size,
                                          *self.summary.shape[3:]))
        pages = ceil_div(used, self.page_size)
        summary[:, :, :pages].copy_(self.summary[:, :, :pages])
        self.summary = summary

    # -- the device side --------------------------------------------------------------------

    def _refresh_tail(self, device_keys: Tensor) -> None:
        """``tail`` from ``device_keys`` (``[B, Hkv, T, D]`` on the compute device, T >= every row)."""
        batch, heads, tokens, dim = device_keys.shape
        lens = self.lens_on(self.compute_device).to(torch.long)
        start = (lens - 1).clamp(min=0).div(self.page_size, rounding_mode="floor") * self.page_size
        positions = (start[:, None] + torch.arange(self.page_size, device=lens.device)).clamp(max=tokens - 1)
        index = positions[:, None, :, None].expand(batch, heads, self.page_size, dim)
        self.tail.copy_(device_keys.gather(2, index))

    def _prepare_all(self, device_keys: Tensor) -> None:
        """Summary of every page and the tail, from the keys on the compute device."""
        self.method.prepare(self.summary, device_keys, self.page_size, 0, self.lens_on(self.compute_device))
        self._refresh_tail(device_keys)

    def _set_lengths_both(self, lens: Tensor) -> None:
        self.set_lengths(lens)
        self.lens_on(self.compute_device)

    def prepare(self, first_page: int, profile=None, phase: str = "prefill") -> None:
        self._prepare_all(self._on_device(0, self.max_len))

    # -- writing tokens ---------------------------------------------------------------------

    def write_prefill(self, key_states: Tensor, value_states: Tensor) -> None:
        tokens = key_states.shape[2]
        _write_prefix(self.keys, key_states, 0)
        _write_prefix(self.values, value_states, 0)
        self._set_lengths_both(torch.full((key_states.shape[0],), tokens, dtype=torch.int32))
        self._prepare_all(key_states.to(self.compute_device))

    def write_chunk(self, key_states: Tensor, value_states: Tensor, start: int) -> None:
        end = start + key_states.shape[2]
        self._grow(end)
        self.flush()
        _write_prefix(self.keys, key_states, start)
        _write_prefix(self.values, value_states, start)
        self._set_lengths_both(torch.full((key_states.shape[0],), end, dtype=torch.int32))
        self.prepare(first_page=start // self.page_size)

    def write_decode(self, key_states: Tensor, value_states: Tensor, uniform_rows: bool, profile) -> None:
        """Append one token per row: tail and summary on the device now, the host buffers at the
        next :meth:`flush` (the device -> host copy is started here and not waited for)."""
        self.flush()
        self._grow(self.max_len + 1)
        page = self.page_size
        lens = self.lens_on(self.compute_device)
        batch, heads, _, dim = key_states.shape
        # The tail: the new key at its slot of the row's newest page (a new page starts at slot 0;
        # the slots after the new token are stale and masked by the in-page length).
        slot = (lens.to(torch.long) % page)[:, None, None, None].expand(batch, heads, 1, dim)
        self.tail.scatter_(2, slot, key_states.to(self.compute_device))
        host_positions = self.host_lens.to(torch.long)
        lens.add_(1)
        self._host_steps += 1
        self.max_len += 1
        self.min_len += 1
        for device, other in self.seq_lens.items():
            if device != self.compute_device:
                other.add_(1)
        # Prepare Memory of the newest page, from the tail: the method's own prepare_decode on a
        # one-page buffer, then that page's summary scattered into the layer's summary.
        newest = (lens.to(torch.long) - 1).div(page, rounding_mode="floor")
        in_page = (lens - newest.to(lens.dtype) * page).to(lens.dtype)
        one_page = self.summary.new_zeros((batch, heads, 1, *self.summary.shape[3:]))
        self.method.prepare_decode(one_page, self.tail, page, in_page)
        target = newest[:, None, None, None, None].expand(batch, heads, 1, *self.summary.shape[3:])
        self.summary.scatter_(2, target, one_page)
        # The new token to the host: a small pinned buffer, asynchronously.
        if self._new_keys is None or self._new_keys.shape != key_states.shape:
            self._new_keys = _host_zeros(key_states.shape, key_states.dtype, self.pinned)
            self._new_values = _host_zeros(value_states.shape, value_states.dtype, self.pinned)
        asynchronous = key_states.device.type == "cuda" and self.pinned
        profile.moved(key_states, HOST)
        profile.moved(value_states, HOST)
        self._new_keys.copy_(key_states, non_blocking=asynchronous)
        self._new_values.copy_(value_states, non_blocking=asynchronous)
        event = None
        if key_states.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(key_states.device))
        uniform = int(host_positions[0]) if uniform_rows else None
        self._pending = (event, host_positions, uniform)

    # -- rows -------------------------------------------------------------------------------

    def remove_left_padding(self, valid: Tensor) -> bool:
        valid = valid.to(HOST)
        if bool(valid.all()):
            return False
        self.flush()
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        tokens = valid.shape[1]
        for buf in (self.keys, self.values):
            index = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            prefix = buf[:, :, :tokens]
            prefix.copy_(torch.gather(prefix, 2, index))
        self._set_lengths_both(valid.sum(dim=1))
        self.prepare(first_page=0)
        return True

    def select_rows(self, select) -> None:
        self.flush()
        self.keys = _host_like(select(self.keys), self.pinned)
        self.values = _host_like(select(self.values), self.pinned)
        self.summary, self.tail = select(self.summary), select(self.tail)
        if self.host_lens is not None:
            self._set_lengths_both(select(self.host_lens))


class HostTransfer:
    """The staging buffers and the side stream that the offloaded layers of one cache share.

    Two slots alternate between consecutive sparse layers; each holds pinned host staging for
    the gathered keys and values and their device counterparts (``[B * H * k, P * D]``), reused
    while the shapes stay the same.
    """

    def __init__(self, pieces_per_tensor: int = 2, threads: Optional[int] = None):
        if pieces_per_tensor < 1:
            raise ValueError(f"HostTransfer: pieces_per_tensor must be >= 1, got {pieces_per_tensor}")
        if threads is not None and threads < 1:
            raise ValueError(f"HostTransfer: threads must be None (torch's intra-op threads) or >= 1, got {threads}")
        self.pieces_per_tensor = pieces_per_tensor
        self.threads = threads  # intra-op threads of the host gather (None: torch.get_num_threads())
        self.slots: List[Optional[dict]] = [None, None]
        self.turn = 0
        self.stream = None
        self._indices_host: Optional[Tensor] = None

    def _cuda(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def indices_to_host(self, indices: Tensor, pinned: bool) -> Tensor:
        """The page indices on the host; waits for them (the step's one synchronisation)."""
        if not self._cuda(indices.device):
            return indices
        if self._indices_host is None or self._indices_host.shape != indices.shape:
            self._indices_host = torch.empty(indices.shape, dtype=indices.dtype, pin_memory=pinned)
        self._indices_host.copy_(indices, non_blocking=pinned)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(indices.device))
        event.synchronize()
        return self._indices_host

    def _slot(self, rows: int, key_width: int, value_width: int, dtype, device, pinned: bool) -> dict:
        index = self.turn
        self.turn ^= 1
        slot = self.slots[index]
        shape = (rows, key_width, value_width, dtype, device, pinned)
        if slot is None or slot["shape"] != shape:
            if slot is not None and slot["copied"] is not None:
                slot["copied"].synchronize()
            slot = {"shape": shape, "copied": None, "consumed": None,
                    "host_k": torch.empty((rows, key_width), dtype=dtype, pin_memory=pinned),
                    "host_v": torch.empty((rows, value_width), dtype=dtype, pin_memory=pinned)}
            if self._cuda(device):
                slot["dev_k"] = torch.empty((rows, key_width), dtype=dtype, device=device)
                slot["dev_v"] = torch.empty((rows, value_width), dtype=dtype, device=device)
            else:
                slot["dev_k"], slot["dev_v"] = slot["host_k"], slot["host_v"]
            self.slots[index] = slot
        return slot

    def gather(self, host_keys: Tensor, host_values: Tensor, flat_pages: Tensor, device: torch.device,
               pinned: bool) -> dict:
        """Gather rows ``flat_pages`` of the host page tables ``[pages, P * D]`` to ``device``.

        Returns the slot; its ``dev_k``/``dev_v`` hold the pages on ``device`` once the current
        stream has waited for them (done here); call :meth:`consumed` after the Apply that reads them.
        """
        rows = flat_pages.shape[0]
        slot = self._slot(rows, host_keys.shape[1], host_values.shape[1], host_keys.dtype, device, pinned)
        cuda = self._cuda(device)
        if cuda:
            if slot["copied"] is not None:
                slot["copied"].synchronize()  # its staging may still be read by the previous copy
            if self.stream is None or self.stream.device != device:
                self.stream = torch.cuda.Stream(device)
            if slot["consumed"] is not None:
                # The device slot may still be read by the Apply of two sparse layers ago.
                self.stream.wait_event(slot["consumed"])
        bounds = [rows * i // self.pieces_per_tensor for i in range(self.pieces_per_tensor + 1)]
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            for source, host, dev in ((host_keys, slot["host_k"], slot["dev_k"]),
                                      (host_values, slot["host_v"], slot["dev_v"])):
                for start, end in zip(bounds, bounds[1:]):
                    if start == end:
                        continue
                    # The host gathers this piece while the previous one is in flight.
                    torch.index_select(source, 0, flat_pages[start:end], out=host[start:end])
                    if cuda:
                        with torch.cuda.stream(self.stream):
                            dev[start:end].copy_(host[start:end], non_blocking=pinned)
        finally:
            if self.threads is not None:
                torch.set_num_threads(threads)
        if cuda:
            copied = torch.cuda.Event()
            copied.record(self.stream)
            slot["copied"] = copied
            torch.cuda.current_stream(device).wait_event(copied)
        return slot

    def consumed(self, slot: dict, device: torch.device) -> None:
        if self._cuda(device):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            slot["consumed"] = event


def host_page_rows(indices: Tensor, kv_heads: int, pages_capacity: int) -> Tensor:
    """``int64 [B * H * k]``: row of each selected page in the host page table
    ``keys.view(B * Hkv * pages_capacity, P * D)``; ``-1`` (padding) reads page 0 of its head,
    which Apply masks. ``H`` is ``Hkv`` or a multiple of it (per query head: head ``h`` reads kv
    head ``h // (H / Hkv)``)."""
    batch, heads, _ = indices.shape
    if heads % kv_heads:
        raise ValueError(f"offload: the selection has {heads} heads, not a multiple of the {kv_heads} kv heads")
    kv_head = torch.arange(heads) // (heads // kv_heads)
    base = (torch.arange(batch)[:, None] * kv_heads + kv_head[None, :]) * pages_capacity
    return (base[:, :, None] + indices.to(torch.long).clamp(min=0)).reshape(-1)


def offload_decode(layer, query: Tensor, scale: float) -> Tensor:
    """Relevancy -> host gather -> Apply of one decode token of an offloaded sparse layer."""
    if torch.compiler.is_compiling():
        raise RuntimeError("MemopsConfig(offload='host_gather') cannot be compiled or captured: the host gathers the "
                           "selected pages after reading their indices back; run the model eagerly")
    cfg, storage = layer.config, layer.storage
    profile = layer.profile or NO_PROFILE
    device, page = storage.compute_device, cfg.page_size
    if layer.transfer is None:
        layer.transfer = HostTransfer()
    transfer = layer.transfer
    lens = storage.lens_on(device)
    with layer._step("decode", "relevancy"):
        pages = ceil_div(storage.max_len, page)
        inputs = SelectionInputs(
            query=query, keys=storage.keys[:, :, :storage.max_len], summary=storage.summary[:, :, :pages],
            seq_lens=lens, num_pages=(lens + (page - 1)) // page, budget_pages=cfg.budget_pages, page_size=page,
            scale=scale, config=cfg, layer_idx=layer.layer_idx)
        indices = layer.method.select(inputs)
        layer.last_selection = indices
        # Valid tokens of each row's gathered prefix (every head selects the row's last page).
        tokens = (lens.to(torch.int32)[:, None, None] - indices * page).clamp(0, page)
        lengths = torch.where(indices >= 0, tokens, 0).sum(dim=-1)[:, 0].to(torch.int32).contiguous()
    batch, heads, budget = indices.shape
    kv_heads, capacity = storage.keys.shape[1], storage.capacity
    with profile.step("decode", "retrieval", (HOST, device)):
        profile.moved(indices, HOST)
        host_indices = transfer.indices_to_host(indices, storage.pinned)
        storage.flush()
        rows = host_page_rows(host_indices, kv_heads, capacity // page)
        key_dim, value_dim = storage.keys.shape[3], storage.values.shape[3]
        slot = transfer.gather(storage.keys.view(-1, page * key_dim), storage.values.view(-1, page * value_dim),
                               rows, device, storage.pinned)
        profile.moved(slot["host_k"], device)
        profile.moved(slot["host_v"], device)
    with layer._step("decode", "apply"):
        keys = slot["dev_k"].view(batch, heads, budget * page, key_dim)
        values = slot["dev_v"].view(batch, heads, budget * page, value_dim)
        out, _ = ops.sparse_apply(query, keys, values, None, page, seq_lens=lengths, scale=scale)
        transfer.consumed(slot, device)
    return out
