"""The buffers of one cache layer: keys, values, page summaries and row lengths, in one place.

Two forms share this class:

- **dynamic** (``capacity=None``): buffers grow on the host when a row would pass their end;
  the host keeps a mirror of the row lengths (known without a sync: the prefill sets them and
  every decode step adds one to each row), so views can be cut to the longest row and Prepare
  Memory can name the first changed page. Steps may sit on different devices.
- **static** (a fixed ``capacity``, e.g. ``max_cache_len``): every buffer is allocated once, at
  full size, and marked as a static address for ``torch.compile``/CUDA graphs; the row lengths
  live only on the device and a decode write is an in-place ``index_put_`` at ``seq_lens[b]``; nothing in a decode
  step reads a value back to the host or allocates by data. All steps on one device.

Every row holds a valid prefix of ``seq_lens[b]`` tokens (left padding is removed after the
prefill, see :meth:`LayerStorage.remove_left_padding`), the ragged-batch contract of the ops.
"""

from __future__ import annotations

import contextlib

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .rows import put_at_rows

# A dynamic buffer grows by at least this many tokens, so that decode steps rarely reallocate.
GROWTH_TOKENS = 256


def ceil_div(a, b):
    return (a + b - 1) // b


class LayerStorage:
    """Keys, values (``[B, Hkv, capacity, D]`` on the memory device), the page summary
    (``[B, Hkv, ceil(capacity / P), R, D]`` on the prepare device, mirrored on the relevancy
    device when that differs), a key mirror on the prepare device when it is not the memory
    device, and ``seq_lens`` (``int32 [B]``, one tensor per device that reads it)."""

    def __init__(self, *, method, page_size: int, sparse: bool, devices: Dict[str, torch.device],
                 key_states: Tensor, value_states: Tensor, capacity: Optional[int], layer_idx: int = 0):
        self.method = method
        self.layer_idx = layer_idx
        self.page_size = page_size
        self.sparse = sparse
        self.static = capacity is not None
        self.memory_device = devices["retrieval"]
        self.prepare_device = devices["prepare"]
        self.relevancy_device = devices["relevancy"]
        batch, heads, tokens, key_dim = key_states.shape
        if self.static:
            if len(set(devices.values())) > 1:
                raise ValueError(
                    f"a static MemopsCache keeps every step on one device; the placement names "
                    f"{sorted({str(d) for d in devices.values()})}: use the dynamic cache (no max_cache_len)")
            if tokens > capacity:
                raise ValueError(f"a static MemopsCache holds max_cache_len={capacity} tokens; the prefill has {tokens}")
        else:
            capacity = tokens + GROWTH_TOKENS
        allocate = torch.zeros if self.static else torch.empty
        dtype = key_states.dtype
        self.has_summary = sparse and method.summary_mode is not None
        self.prepare_keys = None
        self.summary = self.relevancy_summary = None
        with self._in_own_bank():
            self.keys = self._new_kv((batch, heads, capacity, key_dim), dtype, zero=self.static)
            self.values = self._new_kv((batch, heads, capacity, value_states.shape[-1]), value_states.dtype,
                                       zero=self.static)
            if self.has_summary:
                if self.prepare_device != self.memory_device:
                    self.prepare_keys = allocate(self.keys.shape, dtype=dtype, device=self.prepare_device)
                summary_shape = (batch, heads, ceil_div(capacity, page_size), method.representatives,
                                 method.summary_dim(key_dim, dtype))
                self.summary = allocate(summary_shape, dtype=dtype, device=self.prepare_device)
                if self.relevancy_device != self.prepare_device:
                    self.relevancy_summary = allocate(summary_shape, dtype=dtype, device=self.relevancy_device)
        self.seq_lens: Dict[torch.device, Tensor] = {}
        self._host_lens: Optional[Tensor] = None  # dynamic only: CPU lengths at the last set_lengths
        self._host_steps = 0  # dynamic only: decode tokens appended to every row since then
        self.max_len = self.min_len = 0  # dynamic only: longest and shortest row, host ints
        if self.static:
            self.seq_lens[self.memory_device] = torch.zeros(batch, dtype=torch.int32, device=self.memory_device)
            self._mark_static()

    # -- the set of buffers ---------------------------------------------------------------

    def _in_own_bank(self):
        """Context of every allocation: the fpga buffers of layer ``i`` go to HBM bank ``i % 32``
        (one 512 MiB bank holds the KV of a few layers at 8K tokens, not a model's)."""
        if all(d.type != "fpga" for d in (self.memory_device, self.prepare_device, self.relevancy_device)):
            return contextlib.nullcontext()
        from torch_memops import fpga

        return fpga.bank(self.layer_idx % fpga.HBM_BANKS)

    def _new_kv(self, shape, dtype, zero: bool) -> Tensor:
        """A key or value buffer on the memory device (``mapped.py`` keeps them in host memory)."""
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.memory_device)

    def _rehome_kv(self, tensor: Tensor) -> Tensor:
        """A key or value buffer that a row selection produced, where :meth:`_new_kv` puts them."""
        return tensor

    def buffers(self) -> List[Tensor]:
        """Every per-row buffer (dim 0 is the batch)."""
        return [t for t in (self.keys, self.values, self.prepare_keys, self.summary, self.relevancy_summary)
                if t is not None]

    def _mark_static(self) -> None:
        if not torch.compiler.is_compiling():
            for tensor in (*self.buffers(), *self.seq_lens.values()):
                torch._dynamo.mark_static_address(tensor)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def lens_on(self, device: torch.device) -> Tensor:
        """``int32 [B]`` valid tokens of each row on ``device``."""
        lens = self.seq_lens.get(device)
        if lens is None:
            lens = next(iter(self.seq_lens.values())).to(device)
            self.seq_lens[device] = lens
        return lens

    def key_view(self) -> Tensor:
        """Keys to attend: the whole buffer (static) or its first ``max_len`` tokens (dynamic)."""
        return self.keys if self.static else self.keys[:, :, :self.max_len]

    def value_view(self) -> Tensor:
        return self.values if self.static else self.values[:, :, :self.max_len]

    def summary_for_relevancy(self, pages: Optional[int] = None) -> Optional[Tensor]:
        summary = self.relevancy_summary if self.relevancy_summary is not None else self.summary
        return summary if summary is None or pages is None else summary[:, :, :pages]

    # -- lengths ----------------------------------------------------------------------------

    def set_lengths(self, lens: Tensor) -> None:
        """Set every row's length (prefill, padding removal, row selection); may sync."""
        lens = lens.to(torch.int32)
        if self.static:
            self.seq_lens[self.memory_device].copy_(lens)
            return
        self._host_lens, self._host_steps = lens.to("cpu", copy=True), 0
        self.max_len, self.min_len = int(self._host_lens.max()), int(self._host_lens.min())
        self.seq_lens = {self.memory_device: lens.to(self.memory_device, copy=True)}

    def drop_newest(self, tokens: int) -> None:
        """Static only: forget each row's newest ``tokens`` tokens (on the device, no sync). Their
        keys stay in the buffer past the length, where nothing reads them; the summary of the page
        that held them is recomputed by the next decode write into that page."""
        for lens in self.seq_lens.values():
            lens.sub_(tokens).clamp_(min=0)

    @property
    def host_lens(self) -> Optional[Tensor]:
        """Dynamic only: ``int32 [B]`` lengths on the CPU (no device read)."""
        return None if self._host_lens is None else self._host_lens + self._host_steps

    def _grow(self, needed: int) -> None:
        """Dynamic only: reallocate every buffer with room for ``needed`` tokens, keeping the data."""
        if needed <= self.capacity:
            return
        capacity = max(needed + GROWTH_TOKENS, 2 * self.capacity)
        pages = ceil_div(capacity, self.page_size)
        used_pages = ceil_div(self.max_len, self.page_size)

        def grown(tensor: Optional[Tensor], size: int, used: int, kv: bool = False) -> Optional[Tensor]:
            if tensor is None:
                return None
            shape = (*tensor.shape[:2], size, *tensor.shape[3:])
            new = self._new_kv(shape, tensor.dtype, zero=False) if kv else tensor.new_empty(shape)
            new[:, :, :used].copy_(tensor[:, :, :used])
            return new

        with self._in_own_bank():
            self.keys = grown(self.keys, capacity, self.max_len, kv=True)
            self.values = grown(self.values, capacity, self.max_len, kv=True)
            self.prepare_keys = grown(self.prepare_keys, capacity, self.max_len)
            self.summary = grown(self.summary, pages, used_pages)
            self.relevancy_summary = grown(self.relevancy_summary, pages, used_pages)

    # -- writing tokens -----------------------------------------------------------------------

    def _key_targets(self, key_states: Tensor, value_states: Tensor):
        targets = [(self.keys, key_states), (self.values, value_states)]
        if self.prepare_keys is not None:
            targets.append((self.prepare_keys, key_states))
        return targets

    def write_prefill(self, key_states: Tensor, value_states: Tensor) -> None:
        tokens = key_states.shape[2]
        for buf, states in self._key_targets(key_states, value_states):
            buf[:, :, :tokens].copy_(states)
        self.set_lengths(torch.full((key_states.shape[0],), tokens, dtype=torch.int32))
        self.prepare(first_page=0, source=self._prefill_summary_source(key_states))

    def _prefill_summary_source(self, key_states: Tensor) -> Optional[Tensor]:
        """The keys the prefill's summary is computed from; ``None``: the layer's own buffer."""
        return None

    def write_chunk(self, key_states: Tensor, value_states: Tensor, start: int) -> None:
        """Append a multi-token chunk at ``start`` in every row (rows of equal length only)."""
        end = start + key_states.shape[2]
        if self.static and end > self.capacity:
            raise ValueError(f"a static MemopsCache holds max_cache_len={self.capacity} tokens; {end} were written")
        if not self.static:
            self._grow(end)
        for buf, states in self._key_targets(key_states, value_states):
            buf[:, :, start:end].copy_(states)
        self.set_lengths(torch.full((key_states.shape[0],), end, dtype=torch.int32))
        self.prepare(first_page=start // self.page_size)

    def write_decode(self, key_states: Tensor, value_states: Tensor, uniform_rows: bool, profile) -> None:
        """Append one token per row at ``seq_lens[b]``, then refresh the summary of its page."""
        if self.static:
            lens = self.seq_lens[self.memory_device]
            for buf, states in self._key_targets(key_states, value_states):
                put_at_rows(buf, lens, states[:, :, 0])
            lens.add_(1)
            if self.has_summary:
                self.method.prepare_decode(self.summary, self.keys, self.page_size, lens)
            return
        first_page = self.min_len // self.page_size
        self._grow(self.max_len + 1)
        for buf, states in self._key_targets(key_states, value_states):
            if states.device != buf.device:
                profile.moved(states, buf.device)
                states = states.to(buf.device)
            if uniform_rows:
                buf[:, :, self.max_len:self.max_len + 1].copy_(states)
            else:
                rows = torch.arange(buf.shape[0], device=buf.device)
                buf[rows, :, self.lens_on(buf.device).long()] = states[:, :, 0]
        for lens in self.seq_lens.values():
            lens.add_(1)
        self._host_steps += 1
        self.max_len += 1
        self.min_len += 1
        self.prepare(first_page=first_page, profile=profile, phase="decode")

    # -- Prepare Memory -------------------------------------------------------------------------

    def prepare(self, first_page: int, profile=None, phase: str = "prefill", source: Optional[Tensor] = None) -> None:
        """Recompute pages ``first_page ..`` of the summary (all pages at prefill); host path.
        ``source``: the keys to read instead of the buffer (the same tokens, e.g. the prefill's)."""
        if not self.has_summary:
            return
        if source is None:
            source = self.prepare_keys if self.prepare_keys is not None else self.keys
        used = self.max_len if not self.static else self.capacity
        self.method.prepare(self.summary, source[:, :, :used], self.page_size, first_page,
                            self.lens_on(self.prepare_device))
        if self.relevancy_summary is not None:
            pages = ceil_div(used, self.page_size)
            changed = self.summary[:, :, first_page:pages]
            if profile is not None:
                profile.moved(changed, self.relevancy_summary.device)
            self.relevancy_summary[:, :, first_page:pages].copy_(changed)

    # -- rows ---------------------------------------------------------------------------------

    def remove_left_padding(self, valid: Tensor) -> bool:
        """Move each row's valid prefill tokens (``valid: bool [B, S]``) to the front of its row.

        Returns whether anything moved. Runs once, right after the prefill (it syncs).
        """
        valid = valid.to("cpu")
        if bool(valid.all()):
            return False
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        tokens = valid.shape[1]
        for buf in (self.keys, self.values, self.prepare_keys):
            if buf is None:
                continue
            index = order.to(buf.device)[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            prefix = buf[:, :, :tokens]
            prefix.copy_(torch.gather(prefix, 2, index))
        self.set_lengths(valid.sum(dim=1))
        self.prepare(first_page=0)
        return True

    def select_rows(self, select: Callable[[Tensor], Tensor]) -> None:
        """Apply a row selection (beam reorder, repeat, subset) to every buffer and the lengths."""
        if self.static:
            # In place, so that the static addresses stay valid; the batch size cannot change.
            for tensor in (*self.buffers(), *self.seq_lens.values()):
                selected = select(tensor)
                if selected.shape[0] != tensor.shape[0]:
                    raise NotImplementedError("a static MemopsCache cannot change its batch size")
                tensor.copy_(selected)
            return
        self.keys, self.values = self._rehome_kv(select(self.keys)), self._rehome_kv(select(self.values))
        self.prepare_keys = None if self.prepare_keys is None else select(self.prepare_keys)
        self.summary = None if self.summary is None else select(self.summary)
        self.relevancy_summary = None if self.relevancy_summary is None else select(self.relevancy_summary)
        if self.host_lens is not None:
            self.set_lengths(select(self.host_lens))
