"""``MemopsConfig``: the settings of the pipeline, validated when built; device resolution."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch

from .methods import METHODS, get_method

STEPS = ("prepare", "relevancy", "retrieval", "apply")
DEVICE_KINDS = ("auto", "cpu", "cuda", "fpga")
OFFLOAD_KINDS = (None, "host", "host_gather")


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
    method : str
        A name of the method registry (:data:`torch_memops.hf.methods.METHODS`): ``"quest"``
        (per-page min/max of the keys, scored by Quest's upper bound), ``"mean"`` (mean-pooled
        keys scored by a dot product, InfLLM / SeerAttention-style), ``"quest_topp"`` (Quest
        with an adaptive budget, see ``top_p``) or ``"dense"`` (every valid token, through the
        same cache and kernel; for comparison); the evaluation selectors of ``docs/accuracy.md``.
    page_size : int
        Tokens per page. The default 8 came out closest to the oracle per byte read on
        SmolLM2-135M at 4K context, and better than 16 at every budget at 8K (``docs/accuracy.md``).
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
    top_p : float
        For ``method="quest_topp"`` (an adaptive budget): the estimated attention mass that the
        selected pages must reach, in ``(0, 1]``; ``token_budget`` is then the maximum. Other
        methods ignore it. The estimate is overconfident: on SmolLM2 at 8K only the default
        0.99999 kept ``quest``'s quality (``docs/accuracy.md``).
    placement : mapping
        Device of each step in ``("prepare", "relevancy", "retrieval", "apply")``: ``"auto"``
        (the model's device, the default), ``"cpu"``, ``"cuda"`` or ``"fpga"``. The keys and
        values of the sparse layers live on the ``retrieval`` device, the page summaries on the
        ``prepare`` device. ``apply`` cannot be ``"fpga"``: the FPGA backend has no attention
        kernel.
    offload : {None, "host", "host_gather"}
        Keep the keys and values of the sparse layers in page-locked host memory; the page
        summaries, Prepare, Relevancy and Apply stay on the model's device, and only the pages a
        step selects cross to it. ``"host"``: the GPU reads the selected pages in place
        (zero-copy over PCIe, no host work and no synchronisation), so the static cache,
        ``torch.compile`` and CUDA graphs work as on the GPU. ``"host_gather"``: the host gathers
        the selected pages after reading their indices back and copies them on a side CUDA
        stream (double-buffered); dynamic cache only. The dense leading layers stay on the
        model's device. Either sets the placement itself (leave ``placement`` unset) and needs a
        method with a page summary. See ``docs/hf.md``.
    pin_memory : bool
        With ``offload``: page-lock the host buffers (``"host"`` requires it on a GPU;
        ``"host_gather"`` needs it for asynchronous copies; ignored where CUDA is not available).
    defer_stop_check : bool
        On CUDA, let ``generate()`` read its "all rows stopped" flag one step late (transformers'
        ``DeferredStopCheck``), so that the host queues the next decode step while the GPU runs
        this one instead of waiting for it. A generation stopped by EOS runs one step more, which
        is undone (the static cache is cropped; a dynamic cache that the caller gets back keeps
        the per-step check). ``False``: transformers' own rule (a check every step on CUDA).
        See ``torch_memops/hf/stop_check.py``.
    fuse_projections : bool
        Inside ``enable()``, compute each group of projections that read the same input (q/k/v of
        attention, gate/up of the MLP) as one matrix product over one weight, the projections'
        parameters becoming views of it (no extra memory; given back as tensors of their own on
        exit). At decode these are memory-bound GEMVs and the small ones read far below the
        bandwidth of a large one (H200: q, k, v 27-30 us a layer as three, 17 as one). Modules
        whose projections are not plain ``nn.Linear`` (tensor parallel, quantised, offloaded) are
        left alone. See ``torch_memops/hf/fused_projections.py``.
    """

    method: str = "quest"
    page_size: int = 8
    token_budget: int = 1024
    sink_pages: int = 1
    recent_pages: int = 1
    dense_layers: int = 2
    group_reduce: str = "max"
    top_p: float = 0.99999
    placement: Mapping[str, str] = dataclasses.field(default_factory=dict)
    offload: Optional[str] = None
    pin_memory: bool = True
    defer_stop_check: bool = True
    fuse_projections: bool = True

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
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"MemopsConfig.top_p must be a number in (0, 1], got {self.top_p!r}")
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
        if self.offload not in OFFLOAD_KINDS:
            raise ValueError(f"MemopsConfig.offload must be one of {OFFLOAD_KINDS}, got {self.offload!r}")
        if not isinstance(self.pin_memory, bool):
            raise ValueError(f"MemopsConfig.pin_memory must be a bool, got {self.pin_memory!r}")
        if not isinstance(self.defer_stop_check, bool):
            raise ValueError(f"MemopsConfig.defer_stop_check must be a bool, got {self.defer_stop_check!r}")
        if not isinstance(self.fuse_projections, bool):
            raise ValueError(f"MemopsConfig.fuse_projections must be a bool, got {self.fuse_projections!r}")
        if self.offload is not None:
            named = {step: kind for step, kind in self.placement.items() if kind != "auto"}
            if named:
                raise ValueError(
                    f"MemopsConfig.offload={self.offload!r} sets the placement itself (keys and values of the "
                    f"sparse layers in host memory, every step on the model's device); leave placement unset, "
                    f"got {named}")
            if self.method_impl.summary_mode is None:
                raise ValueError(
                    f"MemopsConfig.offload={self.offload!r} needs a method with a page summary (Relevancy runs "
                    f"on the model's device from the summary alone); method {self.method!r} has none")

    @property
    def budget_pages(self) -> int:
        """Pages selected per decode step and kv head."""
        return self.token_budget // self.page_size

    @property
    def method_impl(self):
        """The registered :class:`~torch_memops.hf.methods.Method` that ``method`` names."""
        return get_method(self.method)


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
