"""The cache: one :class:`MemopsLayer` per decoder layer (the transformers layer API), its decode
pipeline (Relevancy -> Retrieval -> Apply), and the transformers ``Cache`` subclass.

A layer owns a :class:`~torch_memops.hf.storage.LayerStorage`. ``max_cache_len=None`` gives the
dynamic (growing, host-bookkept) form; an int gives the static, compileable form.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from torch_memops import ops

from .attention import retrieve_and_apply
from .config import STEPS, MemopsConfig, resolve_device
from .methods import SelectionInputs
from .mapped import MappedLayerStorage
from .offload import HostLayerStorage, HostTransfer, offload_decode
from .step_profile import NO_PROFILE, StepProfile
from .storage import LayerStorage, ceil_div

_NO_STEP = contextlib.nullcontext()


class MemopsLayer:
    """One layer of a :class:`MemopsCache`: preallocated keys/values and current page summaries.

    A sparse layer keeps its keys and values on the ``retrieval`` device and the page summaries
    on the ``prepare`` device (mirrored on the ``relevancy`` device when that differs). A dense
    layer (one of the ``dense_layers`` leading layers) keeps its keys and values on the model's
    device and has no summary. ``keys``/``values`` are ``[B, Hkv, S, D]`` views of the buffers
    (the whole capacity for a static layer), ``seq_lens`` the valid tokens of each row.
    """

    is_sliding = False
    supports_early_init = False

    def __init__(self, config: MemopsConfig, sparse: bool, layer_idx: int = 0, max_cache_len: Optional[int] = None):
        if config.offload == "host_gather" and max_cache_len is not None:
            raise ValueError(
                f"MemopsConfig(offload={config.offload!r}) runs on the dynamic MemopsCache only: the host gathers "
                f"the selected pages after reading their indices back, which no CUDA graph or torch.compile can "
                f"capture; got max_cache_len={max_cache_len} (a static cache, e.g. cache_implementation='static'): "
                f"drop it, or use offload='host' (the GPU reads host memory in place, static caches included)")
        self.config = config
        self.method = config.method_impl
        self.sparse = sparse
        self.layer_idx = layer_idx
        self.max_cache_len = max_cache_len
        self.profile: Optional[StepProfile] = None
        self.storage: Optional[LayerStorage] = None
        self.transfer: Optional[HostTransfer] = None  # offload="host_gather": staging shared by the cache's layers
        self.reset()

    @property
    def is_croppable(self) -> bool:
        """A static layer can drop its newest tokens exactly (:meth:`crop`); a dynamic one cannot."""
        return self.max_cache_len is not None

    @property
    def is_compileable(self) -> bool:
        """Static capacity and a method without host synchronisation: a decode step compiles."""
        return self.max_cache_len is not None and self.method.compileable

    # -- the transformers layer API ----------------------------------------------------------

    def reset(self) -> None:
        if self.max_cache_len is not None and self.storage is not None:
            # Keep the static buffers (their addresses are baked into compiled graphs).
            self.storage.seq_lens[self.storage.memory_device].zero_()
            self.seen.zero_()
        else:
            self.storage = None
            self.is_initialized = False
            self.seen = 0
        self.prefilled = False
        self.just_prefilled = False
        self.uniform_rows = True
        self.pending_attention = False
        self.last_selection: Optional[Tensor] = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.model_device = key_states.device
        offloaded = self.sparse and self.config.offload == "host_gather"
        mapped = self.sparse and self.config.offload == "host"
        if offloaded:
            self.devices = {s: self.model_device for s in STEPS}
            self.devices["retrieval"] = torch.device("cpu")
        elif self.sparse and not mapped:
            self.devices = {s: resolve_device(self.config.placement[s], self.model_device) for s in STEPS}
        else:
            self.devices = {s: self.model_device for s in STEPS}
        self.memory_device = self.devices["retrieval"]
        self.apply_device = self.devices["apply"]
        self.device_set = set(self.devices.values())
        if offloaded:
            self.storage = HostLayerStorage(method=self.method, page_size=self.config.page_size,
                                            compute_device=self.model_device, key_states=key_states,
                                            value_states=value_states, pin_memory=self.config.pin_memory)
        elif mapped:
            self.storage = MappedLayerStorage(method=self.method, page_size=self.config.page_size,
                                              device=self.model_device, key_states=key_states,
                                              value_states=value_states, capacity=self.max_cache_len,
                                              pin_memory=self.config.pin_memory)
        else:
            self.storage = LayerStorage(method=self.method, page_size=self.config.page_size, sparse=self.sparse,
                                        devices=self.devices, key_states=key_states, value_states=value_states,
                                        capacity=self.max_cache_len, layer_idx=self.layer_idx)
        if self.max_cache_len is not None:
            # Tokens transformers has seen (padding included), a device tensor as in its StaticLayer.
            self.seen = torch.zeros((), dtype=torch.long, device=self.model_device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.seen)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        """Append the new tokens, keep the summaries current, return the keys/values to attend."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        storage, new_tokens = self.storage, key_states.shape[2]
        self.pending_attention = True
        if self.max_cache_len is not None:
            self.seen.add_(new_tokens)
        else:
            self.seen += new_tokens
        if not self.prefilled:
            self.prefilled = self.just_prefilled = True
            with self._step("prefill", "prepare"):
                storage.write_prefill(key_states, value_states)
            return key_states, value_states
        if new_tokens == 1:
            with self._step("decode", "prepare"):
                storage.write_decode(key_states, value_states, self.uniform_rows, self._active_profile())
            if getattr(storage, "offloaded", False):
                # The host buffers as they are (the newest token lands at the decode step's one
                # synchronisation); the decode path reads the storage, not these.
                return storage.keys[:, :, :storage.max_len], storage.values[:, :, :storage.max_len]
            return self.keys, self.values
        if self.max_cache_len is not None or not self.uniform_rows:
            raise NotImplementedError(
                "MemopsCache: a multi-token forward after the prefill is supported by the dynamic cache on rows "
                "without padding only (the transformers mask addresses the padded positions that the cache removed)"
            )
        start = storage.max_len
        with self._step("prefill", "prepare"):
            storage.write_chunk(key_states, value_states, start)
        return self.keys.to(self.model_device), self.values.to(self.model_device)

    def _step(self, phase: str, name: str):
        """The profiler's timing context of one step, or a no-op one (a compiled step has no profiler)."""
        if torch.compiler.is_compiling():
            return _NO_STEP  # before reading self.profile: a graph must not guard on the profiler
        if self.profile is None or (name == "prepare" and not storage_has_summary(self.storage)):
            return _NO_STEP
        return self.profile.step(phase, name, self.device_set)

    def _active_profile(self):
        """The attached profile, or the no-op ``NO_PROFILE``; never read while compiling (a graph would guard on
        which profiler object is attached and recompile when another one is)."""
        if torch.compiler.is_compiling() or self.profile is None:
            return NO_PROFILE
        return self.profile

    def get_seq_length(self):
        return self.seen

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        if self.max_cache_len is not None:
            # A decode mask of constant size (the decode path does not read it); the prefill's is exact.
            return (query_length if not self.prefilled else self.max_cache_len), 0
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    def offload(self):
        raise NotImplementedError("MemopsCache places its buffers by MemopsConfig.placement; offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("MemopsCache places its buffers by MemopsConfig.placement; offloading is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a negative count, as transformers passes it;
        0 does nothing). Static layers only, on the device without a sync: the lengths go back, and
        the next decode step re-prepares the summary of the page it writes from the keys that
        remain, so the cache is as if those tokens had never come."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"MemopsCache.crop: tokens_to_remove must be an int, got {tokens_to_remove!r}")
        if tokens_to_remove == 0:
            return
        if self.max_cache_len is None:
            raise NotImplementedError("MemopsCache.crop: only the static cache (max_cache_len set) can be cropped; "
                                      "assisted decoding and rollbacks need cache_implementation='static'")
        if tokens_to_remove > 0:
            raise NotImplementedError(
                f"MemopsCache.crop: pass the number of tokens to remove as a negative int (transformers' current "
                f"convention); the deprecated absolute length {tokens_to_remove} would need a host read of the length")
        if not self.is_initialized:
            return
        self.seen.sub_(-tokens_to_remove).clamp_(min=0)
        self.storage.drop_newest(-tokens_to_remove)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device)])

    def _select_rows(self, select) -> None:
        if self.storage is not None:
            self.storage.select_rows(select)

    @property
    def batch_size(self) -> int:
        return self.storage.batch_size

    # -- state -----------------------------------------------------------------------------

    @property
    def keys(self) -> Optional[Tensor]:
        return None if self.storage is None else self.storage.key_view()

    @property
    def values(self) -> Optional[Tensor]:
        return None if self.storage is None else self.storage.value_view()

    @property
    def seq_lens_host(self) -> Tensor:
        """``int32 [B]`` valid tokens of each row, on the CPU (a static layer copies them: a sync)."""
        storage = self.storage
        return storage.host_lens if not storage.static else storage.lens_on(storage.memory_device).cpu()

    def seq_lens_on(self, device: torch.device) -> Tensor:
        """``int32 [B]`` valid tokens of each row on ``device``."""
        return self.storage.lens_on(device)

    def remove_left_padding(self, valid: Tensor) -> None:
        """Move each row's valid prefill tokens (``valid: bool [B, S]``) to the front of its buffer."""
        with self._step("prefill", "prepare"):
            if self.storage.remove_left_padding(valid):
                self.uniform_rows = False

    # -- decode: Compute Relevancy -> Retrieval -> Apply ---------------------------------

    def decode_attention(self, query: Tensor, scale: float) -> Tensor:
        """Attention of one decode token ``query: [B, Hq, D]``; returns ``[B, Hq, D]`` on its device."""
        cfg, storage = self.config, self.storage
        profile = self._active_profile()
        memory_device, apply_device = self.memory_device, self.apply_device
        seq_lens = storage.lens_on(memory_device)
        if getattr(storage, "offloaded", False):
            return offload_decode(self, query, scale)
        keys, values = self.keys, self.values
        if not self.sparse:
            with self._step("decode", "dense"):
                out, _ = ops.sparse_apply(query, keys, values, None, cfg.page_size, seq_lens=seq_lens, scale=scale)
            return out
        indices = None
        if storage.has_summary:
            relevancy_device = self.relevancy_device
            # Relevancy + top-k + Apply as one op (one launch on CUDA) when they share a device;
            # a profiled step runs them apart, so that the profiler times each.
            fused = (self.method.fuses_apply and relevancy_device == memory_device == apply_device
                     and profile is NO_PROFILE)
            with self._step("decode", "relevancy"):
                profile.moved(query, relevancy_device)
                relevancy_lens = storage.lens_on(relevancy_device)
                pages = None if storage.static else ceil_div(storage.max_len, cfg.page_size)
                inputs = SelectionInputs(
                    query=query.to(relevancy_device), keys=keys, summary=storage.summary_for_relevancy(pages),
                    seq_lens=relevancy_lens, num_pages=(relevancy_lens + (cfg.page_size - 1)) // cfg.page_size,
                    budget_pages=cfg.budget_pages, page_size=cfg.page_size, scale=scale, config=cfg,
                    layer_idx=self.layer_idx)
                if fused:
                    out, indices = self.method.select_and_apply(inputs, values)
                    if not storage.static:
                        self.last_selection = indices
                    return out.to(query.device)
                indices = self.method.select(inputs)
                if not storage.static:
                    self.last_selection = indices
                if indices is not None:
                    profile.moved(indices, memory_device)
                    indices = indices.to(memory_device)
        else:
            indices = self.method.select(SelectionInputs(
                query=query, keys=keys, summary=None, seq_lens=seq_lens,
                num_pages=(seq_lens + (cfg.page_size - 1)) // cfg.page_size, budget_pages=cfg.budget_pages,
                page_size=cfg.page_size, scale=scale, config=cfg, layer_idx=self.layer_idx))
        if indices is None or apply_device == memory_device:
            # Retrieval is fused into Apply: sparse_apply gathers the selected pages itself.
            with self._step("decode", "apply"):
                profile.moved(query, memory_device)
                out, _ = ops.sparse_apply(query.to(memory_device), keys, values, indices, cfg.page_size,
                                          seq_lens=seq_lens, scale=scale)
        else:
            out = retrieve_and_apply(query, keys, values, indices, cfg.page_size, seq_lens, scale, apply_device,
                                     profile)
        profile.moved(out, query.device)
        return out.to(query.device)

    @property
    def relevancy_device(self) -> torch.device:
        return self.devices["relevancy"]

    def attended_tokens(self) -> Tensor:
        """``int64 [B, Hkv]`` tokens that the last decode step of this layer attended to (dynamic cache)."""
        lens = self.seq_lens_host.long()
        if self.sparse and self.last_selection is None and not self.storage.has_summary and self.prefilled:
            return lens[:, None].expand(-1, self.storage.keys.shape[1]).clone()
        if self.last_selection is None:
            raise RuntimeError("MemopsLayer.attended_tokens: no decode step has run on this sparse layer")
        indices = self.last_selection.to("cpu").long()
        page_tokens = (lens[:, None, None] - indices * self.config.page_size).clamp(0, self.config.page_size)
        return torch.where(indices >= 0, page_tokens, 0).sum(dim=-1)


def storage_has_summary(storage: Optional[LayerStorage]) -> bool:
    return storage is not None and storage.has_summary


_CACHE_CLASSES: Dict[str, type] = {}


def cache_classes() -> Dict[str, type]:
    """Define the transformers subclasses on first use: importing this module never imports transformers."""
    if not _CACHE_CLASSES:
        from transformers.cache_utils import Cache, CacheLayerMixin

        class MemopsCacheLayer(MemopsLayer, CacheLayerMixin):
            __init__ = MemopsLayer.__init__

        class MemopsCache(Cache):
            """transformers ``Cache`` holding one :class:`MemopsLayer` per decoder layer.

            ``MemopsCache(config, num_layers, max_cache_len=None, session=None)``; the first
            ``config.dense_layers`` layers are dense. ``max_cache_len`` makes it static and
            compileable. ``session`` (what :func:`torch_memops.hf.enable` yields) is how the
            attention function finds this cache; ``session.new_cache`` passes it.
            """

            def __init__(self, config: MemopsConfig, num_layers: int, max_cache_len: Optional[int] = None,
                         session=None):
                super().__init__(layers=[MemopsCacheLayer(config, sparse=i >= config.dense_layers, layer_idx=i,
                                                          max_cache_len=max_cache_len)
                                         for i in range(num_layers)])
                self.memops_config = config
                self.static_capacity = max_cache_len
                self.session = session
                if config.offload == "host_gather":
                    transfer = HostTransfer()
                    for layer in self.layers:
                        layer.transfer = transfer

            @property
            def max_cache_len(self) -> Optional[int]:
                """Capacity of the static form (``None``: dynamic)."""
                return self.static_capacity

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                if self.session is not None:
                    self.session.active_cache = self
                return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

            @property
            def profile(self) -> Optional[StepProfile]:
                return self.layers[0].profile if self.layers else None

            @profile.setter
            def profile(self, profile: Optional[StepProfile]) -> None:
                for layer in self.layers:
                    layer.profile = profile

        _CACHE_CLASSES.update(MemopsCache=MemopsCache, MemopsCacheLayer=MemopsCacheLayer)
    return _CACHE_CLASSES
