"""Run stock Hugging Face decoder models through the memops pipeline.

``enable(model, config)`` is a context manager. Inside it the model's attention implementation is
``"memops"`` (registered through transformers' ``AttentionInterface`` and
``AttentionMaskInterface``) and ``generate()`` builds a :class:`MemopsCache` (a static, compileable
one with ``cache_implementation="static"``). Prefill runs dense attention (the SDPA function of
transformers, with the SDPA mask) and summarises every page (Prepare Memory). Each decode step
runs Compute Relevancy and Retrieval + Apply of the configured method (the registry of
:mod:`torch_memops.hf.methods`), each on the device that the placement names. Leaving the context
restores the previous attention implementation; nothing is patched at import.

The package, one job per module: ``config`` (MemopsConfig), ``methods`` (the method registry),
``storage`` (the buffers of a cache layer), ``cache`` (the layer and the transformers Cache),
``attention`` (the attention function), ``session`` (enable and its patching), ``stop_check``
(the deferred stop check of generate()), ``step_profile``.
See ``docs/hf.md``.
"""

from .attention import ATTENTION_NAME, memops_attention, retrieve_and_apply
from .cache import MemopsLayer
from .config import DEVICE_KINDS, STEPS, MemopsConfig, fpga_available, resolve_device
from .methods import METHODS, Method, SelectionInputs, get_method, register_method
from .session import SUPPORTED_MODEL_TYPES, Session, cache_argument, enable
from .step_profile import StepProfile

__all__ = ["MemopsConfig", "MemopsCache", "MemopsLayer", "StepProfile", "enable", "cache_argument",
           "SUPPORTED_MODEL_TYPES", "METHODS", "Method", "SelectionInputs", "get_method", "register_method",
           "Session"]


def __getattr__(name: str):
    if name in ("MemopsCache", "MemopsCacheLayer"):
        from .cache import cache_classes

        return cache_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
