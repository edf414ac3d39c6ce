"""``enable(model, config)``: the session, the registration of the attention function and mask,
the patch of ``generate``'s cache preparation, the deferred stop check of its caches
(``stop_check``) and the fused projections (``fused_projections``); all reverted on exit."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .attention import ATTENTION_NAME, SESSION_ATTRIBUTE, memops_attention
from .cache import cache_classes
from .config import MemopsConfig
from . import fused_projections, stop_check

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _check_supported(model) -> None:
    config = _text_config(model)
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
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_modules(model) -> List[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]


class Session:
    """What one ``enable`` context holds: the config, how to build its cache, the active cache.

    ``profile``: an optional :class:`~torch_memops.hf.StepProfile` given to every cache this
    session makes (``generate()``'s included).
    """

    def __init__(self, model, config: MemopsConfig):
        self.model = model
        self.config = config
        self.num_layers = _text_config(model).num_hidden_layers
        self.active_cache = None
        self.profile = None

    def new_cache(self, prefix: Optional[List[Tuple[Tensor, Tensor]]] = None, max_cache_len: Optional[int] = None):
        """A fresh :class:`MemopsCache` for this model (``generate()`` inside the context makes one itself).

        ``max_cache_len``: make it static (fixed capacity of that many tokens, compileable; a
        decode step makes no host synchronisation). ``prefix``: per layer ``(keys, values)``
        ``[B, Hkv, S, D]`` of an already computed prefill (e.g. from a ``DynamicCache``), written
        through ``update`` as a prefill would write them, so that several configurations can share
        one prefill. Rows must hold no padding.
        """
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"new_cache: max_cache_len must be a positive int or None, got {max_cache_len!r}")
        cache = cache_classes()["MemopsCache"](self.config, self.num_layers, max_cache_len=max_cache_len,
                                               session=self)
        if self.profile is not None:
            cache.profile = self.profile
        for layer, (keys, values) in zip(cache.layers, prefix or []):
            layer.update(keys, values)
            layer.just_prefilled = layer.pending_attention = False
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


def _replace_generated_cache(session: Session, prepare_cache):
    """Wrap ``generate``'s cache preparation: the DynamicCache it makes becomes a dynamic
    MemopsCache, a StaticCache (``cache_implementation="static"``) a static one of its size."""
    from transformers.cache_utils import DynamicCache, StaticCache

    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        result = prepare_cache(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            made = model_kwargs.get(name)
            if type(made) is DynamicCache:
                model_kwargs[name] = session.new_cache()
            elif type(made) is StaticCache:
                model_kwargs[name] = session.new_cache(max_cache_len=made.get_max_length())
        return result

    return prepare_cache_for_generation


def _release_cache_after(session: Session, generate):
    """Wrap ``generate``: when it returns, the session drops its reference to the cache the call
    used, so that the cache is freed with the caller's references (else a server's next call
    would build its cache while the last one still held its buffers)."""

    @functools.wraps(generate)
    def generate_and_release(*args, **kwargs):
        try:
            return generate(*args, **kwargs)
        finally:
            session.active_cache = None

    return generate_and_release


@contextmanager
def enable(model, config: Optional[MemopsConfig] = None) -> Iterator[Session]:
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
        ``session.new_cache()`` makes a :class:`MemopsCache` to pass as the cache of a manual
        forward loop (``max_cache_len=N``: the static, compileable form); ``generate()`` makes
        its own (a static one with ``cache_implementation="static"``).

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
    modules = _attention_modules(model)
    if any(getattr(m, SESSION_ATTRIBUTE, None) is not None for m in modules):
        raise RuntimeError("torch_memops.hf.enable: this model is already inside an enable() context")
    session = Session(model, config)
    previous = model.config._attn_implementation
    fused = None
    if _ACTIVE_COUNT == 0:
        _register_interfaces()
    _ACTIVE_COUNT += 1
    try:
        for module in modules:
            setattr(module, SESSION_ATTRIBUTE, session)
        if config.fuse_projections:
            fused = fused_projections.fuse(model)
        model.set_attn_implementation(ATTENTION_NAME)
        model._prepare_cache_for_generation = _replace_generated_cache(session, model._prepare_cache_for_generation)
        model.generate = _release_cache_after(session, model.generate)
        if config.defer_stop_check:
            stop_check.register(session)
        yield session
    finally:
        model.__dict__.pop("_prepare_cache_for_generation", None)
        model.__dict__.pop("generate", None)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
        for module in modules:
            module.__dict__.pop(SESSION_ATTRIBUTE, None)
        fused_projections.unfuse(fused)
        session.active_cache = None
        stop_check.unregister(session)
        _ACTIVE_COUNT -= 1
        if _ACTIVE_COUNT == 0:
            _unregister_interfaces()
