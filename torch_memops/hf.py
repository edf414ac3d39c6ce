"""Run stock Hugging Face decoder models through the memops pipeline.

``enable(model, config)`` is a context manager. Inside it the model's attention implementation is
``"memops"`` (registered through transformers' ``AttentionInterface`` and
``AttentionMaskInterface``) and ``generate()`` builds a :class:`MemopsCache`. Prefill runs dense
attention (the SDPA function of transformers, with the SDPA mask) and summarises every page
(Prepare Memory). Each decode step runs Compute Relevancy (``topk_relevancy``), Retrieval and
Apply (``sparse_apply``, or ``gather_retrieve`` + a transfer + ``sparse_apply`` when Apply is
placed on another device than the memory), each on the device that the placement names. Leaving
the context restores the previous attention implementation; nothing is patched at import.

Left padding: the valid tokens of a row are moved to the front of that row's buffer right after
the dense prefill (the prefill mask says which they are), so every row holds a valid prefix of
length ``seq_lens[b]``, the ragged-batch contract of the ops. Positions (RoPE) are applied before
caching, so moving the tokens does not change them. See ``docs/hf.md``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from torch_memops import ops

__all__ = ["MemopsConfig", "MemopsCache", "MemopsLayer", "StepProfile", "enable", "cache_argument",
           "SUPPORTED_MODEL_TYPES"]

ATTENTION_NAME = "memops"
STEPS = ("prepare", "relevancy", "retrieval", "apply")
DEVICE_KINDS = ("auto", "cpu", "cuda", "fpga")
# method -> (prepare_memory mode, topk_relevancy mode)
METHODS = {"quest": ("minmax", "bound"), "mean": ("mean", "dot"), "dense": ("minmax", "bound")}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
# Buffers grow by at least this many tokens, so that decode steps rarely reallocate.
_GROWTH_TOKENS = 256


# Token and page counts are int32 in the kernels (torch_memops.ops.MAX_COUNT).
_MAX_COUNT = 2**31 - 1


def _require_int(name: str, value, minimum: int, maximum: int = _MAX_COUNT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"MemopsConfig.{name} must be an int in [{minimum}, {maximum}] (token "
                         f"and page counts are int32), got {value!r}")


@dataclasses.dataclass(frozen=True)
class MemopsConfig:
    """Settings of the memops pipeline.

    Parameters
    ----------
    method : {"quest", "mean", "dense"}
        ``"quest"``: per-page min/max of the keys, scored by Quest's upper bound. ``"mean"``:
        mean-pooled keys scored by a dot product (InfLLM / SeerAttention-style selectors).
        ``"dense"``: the same path selecting every page (for comparison).
    page_size : int
        Tokens per page.
    token_budget : int
        Tokens attended per decode step and kv head in the sparse layers; ``token_budget //
        page_size`` pages are selected.
    sink_pages, recent_pages : int
        Pages at the start and end of each row that are always selected (they count toward the
        budget). ``recent_pages >= 1``: the page holding the current token is always attended.
    dense_layers : int
        Leading layers that keep dense attention (Quest keeps the first two).
    group_reduce : {"max", "sum"}
        How the query heads of a GQA group share one selection.
    placement : mapping
        Device of each step in ``("prepare", "relevancy", "retrieval", "apply")``: ``"auto"``
        (the model's device, the default), ``"cpu"``, ``"cuda"`` or ``"fpga"``. The keys and
        values of the sparse layers live on the ``retrieval`` device, the page summaries on the
        ``prepare`` device. ``apply`` cannot be ``"fpga"``: the FPGA backend has no attention
        kernel.
    """

    method: str = "quest"
    page_size: int = 16
    token_budget: int = 1024
    sink_pages: int = 1
    recent_pages: int = 1
    dense_layers: int = 2
    group_reduce: str = "max"
    placement: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"MemopsConfig.method must be one of {sorted(METHODS)}, got {self.method!r}")
        _require_int("page_size", self.page_size, 1)
        _require_int("token_budget", self.token_budget, 1)
        _require_int("sink_pages", self.sink_pages, 0)
        _require_int("recent_pages", self.recent_pages, 1)
        _require_int("dense_layers", self.dense_layers, 0)
        forced_tokens = (self.sink_pages + self.recent_pages) * self.page_size
        if self.token_budget < forced_tokens:
            raise ValueError(
                f"MemopsConfig.token_budget ({self.token_budget}) is smaller than (sink_pages + "
                f"recent_pages) * page_size = ({self.sink_pages} + {self.recent_pages}) * "
                f"{self.page_size} = {forced_tokens}, the tokens that are always selected"
            )
        if self.group_reduce not in ("max", "sum"):
            raise ValueError(f"MemopsConfig.group_reduce must be 'max' or 'sum', got {self.group_reduce!r}")
        if not isinstance(self.placement, Mapping):
            raise ValueError(f"MemopsConfig.placement must be a mapping step -> device, got {self.placement!r}")
        for step, kind in self.placement.items():
            if step not in STEPS:
                raise ValueError(f"MemopsConfig.placement: unknown step {step!r}; the steps are {STEPS}")
            if kind not in DEVICE_KINDS:
                raise ValueError(
                    f"MemopsConfig.placement[{step!r}] must be one of {DEVICE_KINDS}, got {kind!r}"
                )
        if self.placement.get("apply") == "fpga":
            raise ValueError(
                "MemopsConfig.placement['apply'] cannot be 'fpga': the FPGA backend offers "
                "prepare_memory, topk_relevancy and gather_retrieve only; place apply on 'cpu' or 'cuda'"
            )
        object.__setattr__(self, "placement", {step: self.placement.get(step, "auto") for step in STEPS})

    @property
    def budget_pages(self) -> int:
        """Pages selected per decode step and kv head."""
        return self.token_budget // self.page_size


def resolve_device(kind: str, model_device: torch.device) -> torch.device:
    """The device a placement entry names, given the device the model computes on."""
    if kind == "auto":
        return model_device
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if model_device.type == "cuda":
            return model_device
        if not torch.cuda.is_available():
            raise RuntimeError("MemopsConfig.placement names 'cuda', but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    if not fpga_available():
        raise RuntimeError(
            "MemopsConfig.placement names 'fpga', but the FPGA device is not available: "
            "torch_memops.fpga is not importable or did not register torch.device('fpga')"
        )
    return torch.device("fpga", 0)


def fpga_available() -> bool:
    """Whether ``torch_memops.fpga`` imports and tensors can be created on ``torch.device("fpga")``."""
    try:
        import torch_memops.fpga  # noqa: F401
        torch.empty(1, device="fpga")
    except (ImportError, RuntimeError):
        return False
    return True


def _ceil_div(a, b):
    return (a + b - 1) // b


class _Buffer:
    """A ``[B, H, capacity, ...]`` tensor that grows along dim 2, keeping its first ``used`` rows."""

    def __init__(self, like: Tensor, capacity: int, device: torch.device, dims: Tuple[int, ...]):
        self.data = torch.empty((like.shape[0], like.shape[1], capacity, *dims), dtype=like.dtype,
                                device=device)

    def ensure(self, needed: int, used: int) -> None:
        capacity = self.data.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed + _GROWTH_TOKENS, 2 * capacity)
        grown = self.data.new_empty((*self.data.shape[:2], new_capacity, *self.data.shape[3:]))
        grown[:, :, :used].copy_(self.data[:, :, :used])
        self.data = grown


class StepProfile:
    """Wall time of the four steps and bytes moved between devices, summed over a run.

    Attach one to every layer of a cache (``layer.profile = StepProfile()``). ``"dense"`` is the
    decode attention of the leading dense layers; ``"retrieval"`` appears only when Apply runs on
    another device than the memory (otherwise it is fused into ``"apply"``). Timing synchronises
    CUDA devices around each step, so a profiled run is slower than an unprofiled one; it shows
    where the time goes, not the fastest time. Prefill work is kept apart from decode work.
    """

    def __init__(self):
        self.seconds: Dict[Tuple[str, str], float] = {}
        self.bytes_moved: Dict[Tuple[str, str, str], int] = {}

    @contextmanager
    def step(self, phase: str, name: str, devices):
        _synchronize(devices)
        start = time.perf_counter()
        yield
        _synchronize(devices)
        key = (phase, name)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def moved(self, tensor: Tensor, destination: torch.device) -> None:
        if tensor.device != destination:
            key = (str(tensor.device), str(destination), "")
            self.bytes_moved[key] = self.bytes_moved.get(key, 0) + tensor.numel() * tensor.element_size()

    def summary(self, decode_steps: int) -> dict:
        steps = max(decode_steps, 1)
        return {
            "decode_ms_per_step": {name: 1e3 * sec / steps for (phase, name), sec in self.seconds.items()
                                   if phase == "decode"},
            "prefill_ms": {name: 1e3 * sec for (phase, name), sec in self.seconds.items() if phase == "prefill"},
            "bytes_moved_per_decode_step": {f"{src}->{dst}": n / steps for (src, dst, _), n in self.bytes_moved.items()},
            "decode_steps": decode_steps,
        }

    def table(self, decode_steps: int) -> str:
        summary = self.summary(decode_steps)
        lines = [f"{'step (all layers)':<18}{'decode ms/step':>16}{'prefill ms':>14}"]
        for name in (*STEPS, "dense"):
            decode = summary["decode_ms_per_step"].get(name)
            prefill = summary["prefill_ms"].get(name)
            lines.append(f"{name:<18}{'-' if decode is None else f'{decode:.3f}':>16}"
                         f"{'-' if prefill is None else f'{prefill:.1f}':>14}")
        lines.append("bytes moved per decode step: " + (", ".join(
            f"{route} {int(n)}" for route, n in summary["bytes_moved_per_decode_step"].items()) or "none"))
        return "\n".join(lines)


def _synchronize(devices) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def retrieve_and_apply(query: Tensor, keys: Tensor, values: Tensor, indices: Tensor, page_size: int,
                       seq_lens: Tensor, scale: float, apply_device: torch.device,
                       profile: Optional[StepProfile] = None) -> Tensor:
    """Retrieval on the memory device, transfer of the selected pages, Apply on ``apply_device``.

    ``keys``/``values``: ``[B, Hkv, S, D]`` on the memory device; ``indices``: ``int32 [B, Hkv, k]``
    from ``topk_relevancy`` with ``recent_pages >= 1``. Only ``k * page_size`` tokens per head
    cross. Because every head then selects the row's last (possibly partial) page, each row's
    gathered valid tokens form a prefix of one length across heads, which ``sparse_apply`` takes as
    ``seq_lens``. Returns ``[B, Hq, D]`` on ``apply_device``.
    """
    profile = profile or _NO_PROFILE
    devices = (keys.device, apply_device)
    with profile.step("decode", "retrieval", devices):
        gathered_keys, lengths = ops.gather_retrieve(keys, indices, page_size, seq_lens=seq_lens)
        gathered_values, _ = ops.gather_retrieve(values, indices, page_size, seq_lens=seq_lens)
        for tensor in (gathered_keys, gathered_values, lengths):
            profile.moved(tensor, apply_device)
        gathered_keys, gathered_values = gathered_keys.to(apply_device), gathered_values.to(apply_device)
        lengths = lengths[:, 0].contiguous().to(apply_device)
    with profile.step("decode", "apply", devices):
        out, _ = ops.sparse_apply(query.to(apply_device), gathered_keys, gathered_values, None, page_size,
                                  seq_lens=lengths, scale=scale)
    return out


class _NoProfile:
    @contextmanager
    def step(self, phase, name, devices):
        yield

    def moved(self, tensor, destination):
        pass


_NO_PROFILE = _NoProfile()


class MemopsLayer:
    """One layer of a :class:`MemopsCache`: preallocated keys/values and current page summaries.

    A sparse layer keeps its keys and values on the ``retrieval`` device and the page summaries
    on the ``prepare`` device (mirrored on the ``relevancy`` device when that differs). A dense
    layer (one of the ``dense_layers`` leading layers) keeps its keys and values on the model's
    device and has no summary. ``keys``/``values`` are views ``[B, Hkv, S, D]`` of the buffers,
    ``seq_lens`` the valid tokens of each row (after left padding was removed).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, config: MemopsConfig, sparse: bool):
        self.config = config
        self.sparse = sparse
        self.profile: Optional[StepProfile] = None
        self.reset()

    # -- the transformers layer API ----------------------------------------------------------

    def reset(self) -> None:
        self.is_initialized = False
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self.seen_tokens = 0
        self.last_selection: Optional[Tensor] = None
        self.padding_removed = False
        self._host_lens: Optional[Tensor] = None
        self._device_lens: Dict[torch.device, Tensor] = {}

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.model_device = key_states.device
        placement = self.config.placement
        if self.sparse:
            self.devices = {s: resolve_device(placement[s], self.model_device) for s in STEPS}
        else:
            self.devices = {s: self.model_device for s in STEPS}
        self.memory_device = self.devices["retrieval"]
        capacity = key_states.shape[2] + _GROWTH_TOKENS
        head_dim = key_states.shape[-1]
        self._key_buf = _Buffer(key_states, capacity, self.memory_device, (head_dim,))
        self._value_buf = _Buffer(value_states, capacity, self.memory_device, (value_states.shape[-1],))
        if self.sparse:
            reps = 2 if METHODS[self.config.method][0] == "minmax" else 1
            pages = _ceil_div(capacity, self.config.page_size)
            prepare_device = self.devices["prepare"]
            self._summary = _Buffer(key_states, pages, prepare_device, (reps, head_dim))
            self._prepare_keys = (None if prepare_device == self.memory_device
                                  else _Buffer(key_states, capacity, prepare_device, (head_dim,)))
            relevancy_device = self.devices["relevancy"]
            self._relevancy_summary = (None if relevancy_device == prepare_device
                                       else _Buffer(key_states, pages, relevancy_device, (reps, head_dim)))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        """Append the new tokens, keep the summaries current, return the keys/values to attend."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[2]
        self.seen_tokens += new_tokens
        if self._host_lens is None:
            self._write_prefill(key_states, value_states)
            keys, values = key_states, value_states
        elif new_tokens == 1:
            self._write_decode_token(key_states, value_states)
            keys, values = self.keys, self.values
        else:
            self._write_chunk(key_states, value_states)
            keys, values = self.keys.to(self.model_device), self.values.to(self.model_device)
        _LAST_UPDATE.layer, _LAST_UPDATE.keys = self, keys
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def offload(self):
        raise NotImplementedError("MemopsCache places its buffers by MemopsConfig.placement; offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("MemopsCache places its buffers by MemopsConfig.placement; offloading is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MemopsCache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device)])

    @property
    def batch_size(self) -> int:
        return self._key_buf.data.shape[0]

    # -- state -----------------------------------------------------------------------------

    @property
    def seq_lens_host(self) -> Tensor:
        """``int32 [B]`` valid tokens of each row, on the CPU."""
        return self._host_lens

    def seq_lens_on(self, device: torch.device) -> Tensor:
        """``int32 [B]`` valid tokens of each row on ``device`` (copied once per change)."""
        cached = self._device_lens.get(device)
        if cached is None:
            cached = self._host_lens.to(device)
            self._device_lens[device] = cached
        return cached

    def _set_lengths(self, host_lens: Tensor) -> None:
        self._host_lens = host_lens.to(torch.int32)
        self._device_lens = {}
        self._refresh_views()

    def _refresh_views(self) -> None:
        used = int(self._host_lens.max())
        self.keys = self._key_buf.data[:, :, :used]
        self.values = self._value_buf.data[:, :, :used]

    def _select_rows(self, select) -> None:
        if not self.is_initialized:
            return
        buffers = [self._key_buf, self._value_buf]
        if self.sparse:
            buffers += [b for b in (self._summary, self._prepare_keys, self._relevancy_summary) if b is not None]
        for buf in buffers:
            buf.data = select(buf.data)
        if self._host_lens is not None:
            self._set_lengths(select(self._host_lens))

    # -- writing tokens and Prepare Memory ------------------------------------------------

    def _write_prefill(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, _, tokens, _ = key_states.shape
        self._key_buf.data[:, :, :tokens].copy_(key_states)
        self._value_buf.data[:, :, :tokens].copy_(value_states)
        if self.sparse and self._prepare_keys is not None:
            self._prepare_keys.data[:, :, :tokens].copy_(key_states)
        self._set_lengths(torch.full((batch,), tokens, dtype=torch.int32))
        self._prepare(first_page=0)

    def _write_chunk(self, key_states: Tensor, value_states: Tensor) -> None:
        if self.padding_removed or bool((self._host_lens != self._host_lens[0]).any()):
            raise NotImplementedError(
                "MemopsCache: a multi-token forward on a cache with left padding is not supported "
                "(the transformers mask addresses the padded positions that the cache removed)"
            )
        start = int(self._host_lens[0])
        end = start + key_states.shape[2]
        self._ensure_capacity(end)
        self._key_buf.data[:, :, start:end].copy_(key_states)
        self._value_buf.data[:, :, start:end].copy_(value_states)
        if self.sparse and self._prepare_keys is not None:
            self._prepare_keys.data[:, :, start:end].copy_(key_states)
        self._set_lengths(self._host_lens + key_states.shape[2])
        self._prepare(first_page=start // self.config.page_size)

    def _write_decode_token(self, key_states: Tensor, value_states: Tensor) -> None:
        lens = self._host_lens
        self._ensure_capacity(int(lens.max()) + 1)
        targets = [(self._key_buf, key_states), (self._value_buf, value_states)]
        if self.sparse and self._prepare_keys is not None:
            targets.append((self._prepare_keys, key_states))
        if self.profile is not None:
            for buf, states in targets:
                self.profile.moved(states, buf.data.device)
        if self.padding_removed:
            for buf, states in targets:
                rows = torch.arange(lens.shape[0], device=buf.data.device)
                buf.data[rows, :, self.seq_lens_on(buf.data.device).long()] = states[:, :, 0].to(buf.data.device)
        else:
            position = int(lens[0])
            for buf, states in targets:
                buf.data[:, :, position:position + 1].copy_(states)
        first_page = int(lens.min()) // self.config.page_size
        self._host_lens = lens + 1
        self._device_lens = {device: t + 1 for device, t in self._device_lens.items()}
        self._refresh_views()
        self._prepare(first_page=first_page, phase="decode")

    def _ensure_capacity(self, tokens: int) -> None:
        used = int(self._host_lens.max())
        self._key_buf.ensure(tokens, used)
        self._value_buf.ensure(tokens, used)
        if self.sparse:
            if self._prepare_keys is not None:
                self._prepare_keys.ensure(tokens, used)
            pages, used_pages = _ceil_div(tokens, self.config.page_size), _ceil_div(used, self.config.page_size)
            self._summary.ensure(pages, used_pages)
            if self._relevancy_summary is not None:
                self._relevancy_summary.ensure(pages, used_pages)

    def _prepare(self, first_page: int, phase: str = "prefill") -> None:
        """Prepare Memory: recompute pages ``first_page ..`` of the summary (all pages at prefill)."""
        if not self.sparse:
            return
        profile = self.profile or _NO_PROFILE
        prepare_device = self.devices["prepare"]
        with profile.step(phase, "prepare", set(self.devices.values())):
            source = self._prepare_keys.data if self._prepare_keys is not None else self._key_buf.data
            used = int(self._host_lens.max())
            mode = METHODS[self.config.method][0]
            ops.prepare_memory_(self._summary.data, source[:, :, :used], self.config.page_size, first_page,
                                mode=mode, seq_lens=self.seq_lens_on(prepare_device))
            if self._relevancy_summary is not None:
                pages = _ceil_div(used, self.config.page_size)
                changed = self._summary.data[:, :, first_page:pages]
                profile.moved(changed, self._relevancy_summary.data.device)
                self._relevancy_summary.data[:, :, first_page:pages].copy_(changed)

    def remove_left_padding(self, valid: Tensor) -> None:
        """Move each row's valid prefill tokens (``valid: bool [B, S]``) to the front of its buffer."""
        valid = valid.to("cpu")
        if bool(valid.all()):
            return
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        tokens = valid.shape[1]
        buffers = [self._key_buf, self._value_buf]
        if self.sparse and self._prepare_keys is not None:
            buffers.append(self._prepare_keys)
        for buf in buffers:
            index = order.to(buf.data.device)[:, None, :, None].expand(-1, buf.data.shape[1], -1, buf.data.shape[3])
            prefix = buf.data[:, :, :tokens]
            prefix.copy_(torch.gather(prefix, 2, index))
        self.padding_removed = True
        self._set_lengths(valid.sum(dim=1))
        self._prepare(first_page=0)

    # -- decode: Compute Relevancy -> Retrieval -> Apply ---------------------------------

    def decode_attention(self, query: Tensor, scale: float) -> Tensor:
        """Attention of one decode token ``query: [B, Hq, D]``; returns ``[B, Hq, D]`` on its device."""
        cfg, profile = self.config, self.profile or _NO_PROFILE
        memory_device, apply_device = self.memory_device, self.devices["apply"]
        devices = set(self.devices.values())
        seq_lens = self.seq_lens_on(memory_device)
        if not self.sparse:
            with profile.step("decode", "dense", devices):
                out, _ = ops.sparse_apply(query, self.keys, self.values, None, cfg.page_size, seq_lens=seq_lens,
                                          scale=scale)
            return out
        relevancy_device = self.devices["relevancy"]
        pages = _ceil_div(self.keys.shape[2], cfg.page_size)
        budget = pages if cfg.method == "dense" else cfg.budget_pages
        with profile.step("decode", "relevancy", devices):
            profile.moved(query, relevancy_device)
            summary = (self._relevancy_summary or self._summary).data[:, :, :pages]
            num_pages = _ceil_div(self.seq_lens_on(relevancy_device), cfg.page_size)
            _, indices = ops.topk_relevancy(
                query.to(relevancy_device), summary, budget, mode=METHODS[cfg.method][1], num_pages=num_pages,
                sink_pages=cfg.sink_pages, recent_pages=cfg.recent_pages, group_reduce=cfg.group_reduce)
            self.last_selection = indices
            profile.moved(indices, memory_device)
            indices = indices.to(memory_device)
        if apply_device == memory_device:
            # Retrieval is fused into Apply: sparse_apply gathers the selected pages itself.
            with profile.step("decode", "apply", devices):
                profile.moved(query, memory_device)
                out, _ = ops.sparse_apply(query.to(memory_device), self.keys, self.values, indices, cfg.page_size,
                                          seq_lens=seq_lens, scale=scale)
        else:
            out = retrieve_and_apply(query, self.keys, self.values, indices, cfg.page_size, seq_lens, scale,
                                     apply_device, profile)
        profile.moved(out, query.device)
        return out.to(query.device)

    def attended_tokens(self) -> Tensor:
        """``int64 [B, Hkv]`` tokens that the last decode step of this layer attended to."""
        if self.last_selection is None:
            raise RuntimeError("MemopsLayer.attended_tokens: no decode step has run on this sparse layer")
        indices = self.last_selection.to("cpu").long()
        lens = self._host_lens.long()[:, None, None]
        page_tokens = (lens - indices * self.config.page_size).clamp(0, self.config.page_size)
        return torch.where(indices >= 0, page_tokens, 0).sum(dim=-1)


_CACHE_CLASSES: Dict[str, type] = {}


def _cache_classes() -> Dict[str, type]:
    """Define the transformers subclasses on first use: importing this module never imports transformers."""
    if not _CACHE_CLASSES:
        from transformers.cache_utils import Cache, CacheLayerMixin

        class MemopsCacheLayer(MemopsLayer, CacheLayerMixin):
            __init__ = MemopsLayer.__init__

        class MemopsCache(Cache):
            """transformers ``Cache`` holding one :class:`MemopsLayer` per decoder layer.

            ``MemopsCache(config, num_layers)``; the first ``config.dense_layers`` layers are dense.
            """

            def __init__(self, config: MemopsConfig, num_layers: int):
                super().__init__(layers=[MemopsCacheLayer(config, sparse=i >= config.dense_layers)
                                         for i in range(num_layers)])
                self.memops_config = config

        _CACHE_CLASSES.update(MemopsCache=MemopsCache, MemopsCacheLayer=MemopsCacheLayer)
    return _CACHE_CLASSES


def __getattr__(name: str):
    if name in ("MemopsCache", "MemopsCacheLayer"):
        return _cache_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The attention function finds the cache layer that produced the keys it receives: update() runs
# right before the attention call of the same layer on the same thread.
_LAST_UPDATE = threading.local()
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, _Session]" = weakref.WeakKeyDictionary()


def _updated_layer(keys: Tensor) -> Optional[MemopsLayer]:
    layer = getattr(_LAST_UPDATE, "layer", None)
    return layer if layer is not None and getattr(_LAST_UPDATE, "keys", None) is keys else None


def memops_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"memops"`` attention function (signature of transformers' ``AttentionInterface``).

    Multi-token forwards (prefill) and forwards without a :class:`MemopsCache` run transformers'
    SDPA attention; one-token forwards on a MemopsCache run the pipeline.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _updated_layer(key)
    _LAST_UPDATE.layer = _LAST_UPDATE.keys = None  # do not keep a finished cache alive
    if layer is None or query.shape[2] > 1:
        output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, **kwargs)
        first_prefill = layer is not None and layer.seen_tokens == query.shape[2] and not layer.padding_removed
        if first_prefill and attention_mask is not None:
            # The last query row of the causal prefill mask marks exactly the row's valid tokens.
            layer.remove_left_padding(attention_mask[:, 0, -1, :].to(torch.bool))
        return output
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = layer.decode_attention(query[:, :, 0].contiguous(), scaling)
    return out[:, None], None


def _check_supported(model) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"torch_memops.hf.enable: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("torch_memops.hf.enable: attention logit soft-capping (attn_logit_softcapping) is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        sliding = True
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        sliding = True
    if sliding:
        raise ValueError(
            f"torch_memops.hf.enable: {model_type} with sliding-window attention (sliding_window="
            f"{getattr(config, 'sliding_window', None)}, layer_types={sorted(set(layer_types))}) is not supported; "
            "only full-attention layers can be sparsified"
        )
    if model.training:
        raise ValueError("torch_memops.hf.enable: the pipeline is for inference; call model.eval() first")


def cache_argument(model) -> str:
    """The name under which ``model.forward`` takes its cache: ``cache`` (newer) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_modules(model) -> List[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]


class _Session:
    """What one ``enable`` context holds: the config and how to build its cache."""

    def __init__(self, model, config: MemopsConfig):
        self.model = model
        self.config = config
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = text_config.num_hidden_layers

    def new_cache(self, prefix: Optional[List[Tuple[Tensor, Tensor]]] = None):
        """A fresh :class:`MemopsCache` for this model (``generate()`` inside the context makes one itself).

        ``prefix``: per layer ``(keys, values)`` ``[B, Hkv, S, D]`` of an already computed prefill
        (e.g. from a ``DynamicCache``), written through ``update`` as a prefill would write them,
        so that several configurations can share one prefill. Rows must hold no padding.
        """
        cache = _cache_classes()["MemopsCache"](self.config, self.num_layers)
        for layer, (keys, values) in zip(cache.layers, prefix or []):
            layer.update(keys, values)
        return cache


_ACTIVE_COUNT = 0


def _register_interfaces() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, memops_attention)
    # Prefill runs SDPA, so it takes SDPA's boolean mask; decode reads only seq_lens.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _unregister_interfaces() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)


def _replace_generated_cache(session: _Session, prepare_cache):
    """Wrap ``generate``'s cache preparation so that the DynamicCache it makes becomes a MemopsCache."""
    from transformers.cache_utils import DynamicCache

    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        result = prepare_cache(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            if type(model_kwargs.get(name)) is DynamicCache:
                model_kwargs[name] = session.new_cache()
        return result

    return prepare_cache_for_generation


@contextmanager
def enable(model, config: Optional[MemopsConfig] = None) -> Iterator[_Session]:
    """Run ``model`` through the memops pipeline inside the context; restore it on exit.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model of a supported family (:data:`SUPPORTED_MODEL_TYPES`), in eval mode.
    config : MemopsConfig, optional
        Pipeline settings (default ``MemopsConfig()``).

    Yields
    ------
    session
        ``session.new_cache()`` makes a :class:`MemopsCache` to pass as ``past_key_values`` to a
        manual forward loop; ``generate()`` makes its own.

    Examples
    --------
    >>> with enable(model, MemopsConfig(token_budget=512)):  # doctest: +SKIP
    ...     tokens = model.generate(**inputs, max_new_tokens=32)
    """
    global _ACTIVE_COUNT
    config = config if config is not None else MemopsConfig()
    if not isinstance(config, MemopsConfig):
        raise TypeError(f"torch_memops.hf.enable: config must be a MemopsConfig, got {type(config).__name__}")
    _check_supported(model)
    if any(m in _SESSIONS for m in _attention_modules(model)):
        raise RuntimeError("torch_memops.hf.enable: this model is already inside an enable() context")
    session = _Session(model, config)
    previous = model.config._attn_implementation
    if _ACTIVE_COUNT == 0:
        _register_interfaces()
    _ACTIVE_COUNT += 1
    modules = _attention_modules(model)
    try:
        for module in modules:
            _SESSIONS[module] = session
        model.set_attn_implementation(ATTENTION_NAME)
        model._prepare_cache_for_generation = _replace_generated_cache(session, model._prepare_cache_for_generation)
        yield session
    finally:
        model.__dict__.pop("_prepare_cache_for_generation", None)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
        for module in modules:
            _SESSIONS.pop(module, None)
        _ACTIVE_COUNT -= 1
        if _ACTIVE_COUNT == 0:
            _unregister_interfaces()
