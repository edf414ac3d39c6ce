"""Where should each step run? Ranked placements from calibrated costs, with what-if devices.

The planner predicts the time (and energy) of one decode token for every placement of the four
steps over the devices, and ranks them. Its inputs:

* **costs of the real ops on the devices present**, from short calibration runs at the workload's
  shapes (:func:`calibrate`): the decode write of one token, ``prepare_memory_`` of the newest
  page, ``topk_relevancy``, ``gather_retrieve`` and ``sparse_apply`` (over the selected pages in
  place, or over gathered pages), and the decode attention of the dense layers;
* **transfer costs**: the copies each placement makes (query, indices, the new token's keys and
  values, the changed page summary, the gathered pages, the output), measured between the devices
  present; to and from a what-if device over a link model (PCIe Gen3 x16 for the U55C);
* **what-if devices** that are not here, labelled as predictions: a U55C model (HBM at 460 GB/s;
  clock and initiation intervals from ``hls/*/qor.json``; PCIe Gen3 x16), and devices a user
  describes by bandwidth, launch latency, link and power (:func:`parse_device_spec`);
* **the rest of the model** per token, measured on the model's device (a profiled run).

One memory location is not a device: ``host``, page-locked host memory that the model's GPU reads
in place (``MemopsConfig(offload="host")``). Its ops are the GPU's kernels on such memory, timed
by :func:`calibrate` where CUDA is present (the decode write, Prepare of the newest page and
``sparse_apply`` over the selected pages, all across PCIe); it is only ever the memory of the
placement ``prepare=GPU, relevancy=GPU, memory=host, apply=GPU``.

The prediction of a placement is the sum over the sparse layers of its step costs and copies (the
pipeline runs its steps one after the other), plus the dense layers and the rest of the model.
Energy: each device's active power over its busy time plus the idle power of the devices the
placement uses over the whole token (powers measured where a counter exists, else stated).
:func:`validate` runs the placements that can run here and reports predicted against measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from torch_memops.profile import MEMORY_STEPS, U55C_POWER_MODEL

SCHEMA = "torch_memops.plan/1"
RUNNABLE_KINDS = ("cpu", "cuda", "fpga", "host")
# The memory location "host": pinned host memory read in place by the model's GPU (offload="host").
HOST_MEMORY = "host"


# -- the shapes of one decode step --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """What one decode token's memory processing works on, per sparse layer."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int           # tokens in the cache at the step modelled
    page_size: int
    budget_pages: int
    representatives: int   # R of the summary: 2 (minmax) or 1 (mean)
    element_bytes: int
    sparse_layers: int
    dense_layers: int
    dtype: str = "float32"
    summary_mode: str = "minmax"
    relevancy_mode: str = "bound"

    @property
    def pages(self) -> int:
        return -(-self.context // self.page_size)

    @property
    def selected_tokens(self) -> int:
        return min(self.budget_pages, self.pages) * self.page_size

    def bytes_of(self, what: str) -> int:
        """Bytes of each copy a placement makes (per sparse layer and token)."""
        b, hq, hkv, d, e = self.batch, self.q_heads, self.kv_heads, self.head_dim, self.element_bytes
        k = min(self.budget_pages, self.pages)
        return {
            "query": b * hq * d * e,
            "indices": b * hkv * k * 4,
            "kv_token": b * hkv * d * e,            # one of keys / values
            "summary_page": b * hkv * self.representatives * d * e,
            "gathered": 2 * b * hkv * k * self.page_size * d * e + b * hkv * 4,
            "out": b * hq * d * e,
        }[what]

    def op_bytes(self, op: str) -> int:
        """HBM/DRAM bytes an op reads and writes (the roofline of a modelled device)."""
        b, hkv, d, e = self.batch, self.kv_heads, self.head_dim, self.element_bytes
        r, p = self.representatives, self.page_size
        kp = self.selected_tokens
        return {
            "write_token": 2 * 2 * b * hkv * d * e,
            "prepare": b * hkv * (p + r) * d * e,
            "relevancy": b * hkv * self.pages * r * d * e + self.bytes_of("query"),
            "gather": 2 * 2 * b * hkv * kp * d * e,
            "apply_sparse": 2 * b * hkv * kp * d * e,
            "apply_gathered": 2 * b * hkv * kp * d * e,
            "dense_attention": 2 * b * hkv * self.context * d * e,
        }[op]


OPS = ("write_token", "prepare", "relevancy", "gather", "apply_sparse", "apply_gathered", "dense_attention")
COPIES = ("query", "indices", "kv_token", "summary_page", "gathered", "out")


def shape_for(model_config, memops_config, context: int, batch: int, dtype: torch.dtype) -> DecodeShape:
    """The :class:`DecodeShape` of a transformers model config under a MemopsConfig."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    q_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
    method = memops_config.method_impl if hasattr(memops_config, "method_impl") else None
    summary_mode = getattr(method, "summary_mode", None) or ("mean" if memops_config.method == "mean" else "minmax")
    if summary_mode not in ("minmax", "mean"):
        # Priced as R * D elements a page and calibrated with 16/32-bit summaries, a packed summary
        # (quest_int8: 2 (D + 16) bytes a page, a QuantizedSummary) would be modelled wrong.
        raise ValueError(f"torch_memops.plan: method {memops_config.method!r} (summary mode {summary_mode!r}) "
                         f"is not modelled; the planner models the minmax and mean summaries (quest, mean, "
                         f"dense and the methods on them)")
    pages = -(-context // memops_config.page_size)
    budget = pages if memops_config.method == "dense" else memops_config.budget_pages
    layers = text.num_hidden_layers
    dense = min(memops_config.dense_layers, layers)
    return DecodeShape(batch=batch, q_heads=q_heads, kv_heads=text.num_key_value_heads, head_dim=head_dim,
                       context=context, page_size=memops_config.page_size, budget_pages=budget,
                       representatives=2 if summary_mode == "minmax" else 1,
                       element_bytes=torch.empty((), dtype=dtype).element_size(), sparse_layers=layers - dense,
                       dense_layers=dense, dtype=str(dtype).removeprefix("torch."), summary_mode=summary_mode,
                       relevancy_mode="bound" if summary_mode == "minmax" else "dot")


# -- devices --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """A device described by numbers instead of measured: every figure of it is a prediction.

    ``bandwidth_gbs``: memory bandwidth the ops stream at; ``launch_us``: fixed cost per op call;
    ``link_gbs``/``link_latency_us``: its link to the host and the other devices; ``can_apply``:
    whether attention (Apply) can run there. ``cycle_model``: optional per-op time function
    ``(op, shape) -> seconds`` (the U55C's from its HLS initiation intervals) taking precedence
    over the roofline.
    """

    name: str
    bandwidth_gbs: float
    launch_us: float
    link_gbs: float
    link_latency_us: float
    idle_watts: float
    active_watts: float
    can_apply: bool = True
    basis: str = "user-described"
    cycle_model: Optional[Callable[[str, DecodeShape], Optional[float]]] = dataclasses.field(
        default=None, compare=False, repr=False)

    def op_seconds(self, op: str, shape: DecodeShape) -> float:
        roofline = self.launch_us * 1e-6 + shape.op_bytes(op) / (self.bandwidth_gbs * 1e9)
        if self.cycle_model is not None:
            cycles = self.cycle_model(op, shape)
            if cycles is not None:
                return max(cycles, roofline)
        return roofline

    def link_seconds(self, nbytes: int) -> float:
        return self.link_latency_us * 1e-6 + nbytes / (self.link_gbs * 1e9)


def _qor(kernel: str) -> dict:
    """``hls/<kernel>/qor.json``: installed beside the package (wheel) or in the checkout."""
    here = Path(__file__).resolve().parent
    for path in (here / "hls" / kernel / "qor.json", here.parent / "hls" / kernel / "qor.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def u55c_model() -> DeviceModel:
    """The Alveo U55C as the planner sees it: 460 GB/s HBM2, the HLS kernels' clock and initiation
    intervals from ``hls/*/qor.json`` (300 MHz and II = 1 per 512-bit word if the files are not
    there), PCIe Gen3 x16 (15.75 GB/s raw, 12 GB/s assumed effective, 10 us per transfer assumed),
    15 us per kernel run assumed (XRT start + wait), the power of :data:`U55C_POWER_MODEL`.
    Attention does not run on it (no kernel)."""
    qors = {k: _qor(k) for k in ("prepare_memory", "topk_relevancy", "gather_retrieve")}
    clock_hz = 1e6 * float(qors["prepare_memory"].get("target_clock_mhz", 300))
    word_bytes = int(qors["prepare_memory"].get("word_bits", 512)) // 8
    launch = 15e-6

    def cycles(op: str, s: DecodeShape) -> Optional[float]:
        row_words = -(-s.head_dim * s.element_bytes // word_bytes)
        rows = s.batch * s.kv_heads
        group = s.q_heads // s.kv_heads
        if op == "prepare":
            # cycles_per_page = page_size * row_words, plus R * row_words to store the summary
            return launch + rows * (s.page_size + s.representatives) * row_words / clock_hz
        if op == "relevancy":
            # a page: R * row_words words to load, G cycles to score (group_reduce max), dataflow
            return launch + rows * s.pages * max(s.representatives * row_words, group) / clock_hz
        if op == "gather":
            return 2 * launch + 2 * rows * s.selected_tokens * row_words / clock_hz
        if op == "write_token":
            return 0.0  # the new token arrives over the link; nothing runs on the card
        return None

    return DeviceModel(name="u55c", bandwidth_gbs=460.0, launch_us=launch * 1e6, link_gbs=12.0, link_latency_us=10.0,
                       idle_watts=U55C_POWER_MODEL.idle_watts, active_watts=U55C_POWER_MODEL.active_watts,
                       can_apply=False, cycle_model=cycles,
                       basis=f"U55C model: 460 GB/s HBM2, {clock_hz / 1e6:.0f} MHz and II from hls/*/qor.json, "
                             "PCIe Gen3 x16 at 12 GB/s + 10 us (assumed), 15 us per kernel run (assumed); "
                             f"power: {U55C_POWER_MODEL.basis}")


def parse_device_spec(text: str) -> DeviceModel:
    """``name=x,bandwidth_gbs=..,launch_us=..,link_gbs=..,link_latency_us=..,idle_w=..,active_w=..,apply=0|1``."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--what-if: expected key=value items, got {item!r} in {text!r}")
        fields[key.strip()] = value.strip()
    known = {"name", "bandwidth_gbs", "launch_us", "link_gbs", "link_latency_us", "idle_w", "active_w", "apply"}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"--what-if: unknown keys {sorted(unknown)}; the keys are {sorted(known)}")
    missing = {"name", "bandwidth_gbs", "link_gbs"} - set(fields)
    if missing:
        raise ValueError(f"--what-if: {sorted(missing)} must be given (in {text!r})")
    name = fields["name"]
    if name in RUNNABLE_KINDS or name == "u55c":
        raise ValueError(f"--what-if: name {name!r} is taken; pick another")
    try:
        return DeviceModel(name=name, bandwidth_gbs=float(fields["bandwidth_gbs"]),
                           launch_us=float(fields.get("launch_us", 5.0)), link_gbs=float(fields["link_gbs"]),
                           link_latency_us=float(fields.get("link_latency_us", 5.0)),
                           idle_watts=float(fields.get("idle_w", 0.0)), active_watts=float(fields.get("active_w", 0.0)),
                           can_apply=fields.get("apply", "1") not in ("0", "no", "false"),
                           basis=f"user-described: {text}")
    except ValueError as error:
        raise ValueError(f"--what-if: a number did not parse in {text!r}: {error}") from None


# -- costs ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CostTable:
    """Seconds of each op per device and of each copy per (source, destination), per sparse layer.

    ``ops[(op, device)]`` and ``copies[(what, src, dst)]`` hold measured (or given) seconds;
    ``models`` the what-if devices, whose costs come from their model. ``rest_of_model_s``: per token,
    on the model's device; ``step_overhead_s[step]``: per sparse layer, the host work of the
    pipeline around the ops of a step (bookkeeping, wrappers), fitted on a profiled run by
    :func:`fit_step_overhead`; ``power[device] = (idle W, active W, basis)``.
    """

    shape: DecodeShape
    model_device: str
    ops: Dict[Tuple[str, str], float] = dataclasses.field(default_factory=dict)
    copies: Dict[Tuple[str, str, str], float] = dataclasses.field(default_factory=dict)
    models: Dict[str, DeviceModel] = dataclasses.field(default_factory=dict)
    rest_of_model_s: float = 0.0
    step_overhead_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    power: Dict[str, Tuple[float, float, str]] = dataclasses.field(default_factory=dict)
    sources: Dict[str, str] = dataclasses.field(default_factory=dict)

    def devices(self) -> List[str]:
        """Devices a step may be placed on (``host`` is a memory location, not one of them)."""
        measured = sorted({d for _, d in self.ops if d != HOST_MEMORY})
        return measured + [name for name in self.models if name not in measured]

    def has_host_memory(self) -> bool:
        return ("apply_sparse", HOST_MEMORY) in self.ops

    def can_apply(self, device: str) -> bool:
        if device in self.models:
            return self.models[device].can_apply
        return device.split(":")[0] != "fpga"

    def op(self, op: str, device: str) -> float:
        if device in self.models:
            return self.models[device].op_seconds(op, self.shape)
        try:
            return self.ops[(op, device)]
        except KeyError:
            raise KeyError(f"CostTable: no cost of {op!r} on {device!r} (calibrated: "
                           f"{sorted({d for _, d in self.ops})})") from None

    def copy(self, what: str, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        for end in (src, dst):
            if end in self.models:
                return self.models[end].link_seconds(self.shape.bytes_of(what))
        try:
            return self.copies[(what, src, dst)]
        except KeyError:
            raise KeyError(f"CostTable: no measured copy of {what!r} from {src!r} to {dst!r}") from None

    def is_modelled(self, device: str) -> bool:
        return device in self.models


@dataclasses.dataclass(frozen=True)
class Placement:
    prepare: str
    relevancy: str
    retrieval: str  # where the keys and values live
    apply: str

    def as_dict(self) -> Dict[str, str]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        return ",".join(f"{s}={d}" for s, d in self.as_dict().items())


def predict(costs: CostTable, placement: Placement) -> dict:
    """Predicted time (per step, ms per decode token) and energy (J per token) of ``placement``."""
    s, m = costs.shape, costs.model_device
    pre, rel, mem, app = placement.prepare, placement.relevancy, placement.retrieval, placement.apply
    busy: Dict[str, float] = {}

    def on(device: str, seconds: float) -> float:
        busy[device] = busy.get(device, 0.0) + seconds
        return seconds

    def link(what: str, src: str, dst: str) -> float:
        seconds = costs.copy(what, src, dst)
        if seconds:
            for end in (src, dst):
                busy[end] = busy.get(end, 0.0) + seconds
        return seconds

    step = {}
    if mem == HOST_MEMORY:
        if not (pre == rel == app == m):
            raise ValueError(f"predict: memory 'host' is read in place by the model's device {m!r}: every step "
                             f"runs there; got {placement.as_dict()}")
        # The GPU writes the token into host memory, prepares the newest page from it and reads
        # the selected pages in place; nothing is copied by the host.
        step["prepare"] = on(m, costs.op("write_token", HOST_MEMORY)) + on(m, costs.op("prepare", HOST_MEMORY))
        step["relevancy"] = on(m, costs.op("relevancy", m))
        step["retrieval"] = 0.0
        step["apply"] = on(m, costs.op("apply_sparse", HOST_MEMORY))
        return _finish(costs, placement, step, busy)
    # Prepare: the new token's keys and values to the memory (and its keys to the prepare device),
    # the newest page's summary, and that page mirrored to the relevancy device.
    step["prepare"] = (2 * link("kv_token", m, mem) + on(mem, costs.op("write_token", mem))
                       + (link("kv_token", m, pre) + on(pre, costs.op("write_token", pre)) / 2 if pre != mem else 0.0)
                       + on(pre, costs.op("prepare", pre)) + link("summary_page", pre, rel))
    step["relevancy"] = link("query", m, rel) + on(rel, costs.op("relevancy", rel)) + link("indices", rel, mem)
    if app == mem:
        step["retrieval"] = 0.0
        step["apply"] = link("query", m, mem) + on(mem, costs.op("apply_sparse", mem)) + link("out", mem, m)
    else:
        step["retrieval"] = on(mem, costs.op("gather", mem)) + link("gathered", mem, app)
        step["apply"] = link("query", m, app) + on(app, costs.op("apply_gathered", app)) + link("out", app, m)
    return _finish(costs, placement, step, busy)


def _finish(costs: CostTable, placement: Placement, step: Dict[str, float], busy: Dict[str, float]) -> dict:
    """Per-token totals, energy and labels of a placement from its per-layer step seconds."""
    s, m = costs.shape, costs.model_device
    for name in step:
        if step[name] or name != "retrieval":
            step[name] += costs.step_overhead_s.get(name, 0.0)
    layers = s.sparse_layers
    per_token = {name: 1e3 * layers * seconds for name, seconds in step.items()}
    busy = {d: layers * v for d, v in busy.items()}
    dense_s = s.dense_layers * costs.op("dense_attention", m) if s.dense_layers else 0.0
    rest_s = costs.rest_of_model_s + dense_s
    busy[m] = busy.get(m, 0.0) + rest_s
    per_token["rest_of_model"] = 1e3 * rest_s
    total_ms = sum(per_token.values())
    per_token["total"] = total_ms
    memory_ms = sum(per_token[k] for k in MEMORY_STEPS)
    energy, energy_basis = 0.0, {}
    for device, seconds in busy.items():
        idle, active, basis = costs.power.get(device, (0.0, 0.0, "no power figure"))
        energy += idle * total_ms / 1e3 + active * min(seconds, total_ms / 1e3)
        energy_basis[device] = basis
    modelled = sorted(d for d in set(placement.as_dict().values()) if costs.is_modelled(d))
    return {"placement": placement.as_dict(), "per_token_ms": per_token, "memory_processing_pct": 100.0 * memory_ms / total_ms,
            "energy_j_per_token": energy, "energy_basis": energy_basis,
            "runnable_here": not modelled and all(d.split(":")[0] in RUNNABLE_KINDS for d in placement.as_dict().values()),
            "label": "prediction from calibrated costs" if not modelled else
                     f"prediction with modelled device(s) {', '.join(modelled)} (not present)"}


def placements(costs: CostTable) -> List[Placement]:
    """Every placement of the four steps over the devices of ``costs`` that the pipeline allows."""
    devices = costs.devices()
    out = []
    for pre, rel, mem, app in itertools.product(devices, repeat=4):
        if not costs.can_apply(app):
            continue
        out.append(Placement(pre, rel, mem, app))
    if costs.has_host_memory():
        m = costs.model_device
        out.append(Placement(m, m, HOST_MEMORY, m))
    return out


def rank(costs: CostTable, objective: str = "latency", limit: Optional[int] = None) -> List[dict]:
    """Predictions of every placement, best first (``objective``: ``"latency"`` or ``"energy"``)."""
    if objective not in ("latency", "energy"):
        raise ValueError(f"rank: objective must be 'latency' or 'energy', got {objective!r}")
    key = (lambda p: p["per_token_ms"]["total"]) if objective == "latency" else (lambda p: p["energy_j_per_token"])
    ranked = sorted((predict(costs, p) for p in placements(costs)), key=key)
    return ranked[:limit] if limit else ranked


# -- calibration --------------------------------------------------------------------------------------


def _time(fn: Callable[[], object], device_kinds: Iterable[str], repeats: int) -> float:
    """Mean seconds of ``fn`` (synchronising the GPU around each call), after one warm-up call.

    The mean, not the median: a profiled run sums every call, preemptions on a busy host included.
    """
    def sync():
        if "cuda" in device_kinds:
            torch.cuda.synchronize()

    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.fmean(samples)


def present_devices() -> List[str]:
    """The runnable devices here: ``cpu``, ``cuda`` if available, ``fpga`` (a card or its emulation)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    try:
        from torch_memops.hf.config import fpga_available
    except ImportError:
        from torch_memops.hf import fpga_available
    if fpga_available():
        devices.append("fpga")
    return devices


def calibrate(shape: DecodeShape, devices: Sequence[str], model_device: str, repeats: int = 5,
              seed: int = 0) -> CostTable:
    """Time the real ops at ``shape`` on each of ``devices`` and the copies between them."""
    from torch_memops import ops

    dtype = getattr(torch, shape.dtype)
    generator = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, p = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.page_size
    capacity = shape.context + 1
    keys_h = torch.randn(b, hkv, capacity, d, generator=generator).to(dtype)
    values_h = torch.randn(b, hkv, capacity, d, generator=generator).to(dtype)
    query_h = torch.randn(b, hq, d, generator=generator).to(dtype)
    lens_h = torch.full((b,), shape.context, dtype=torch.int32)
    summary_h = ops.prepare_memory(keys_h[:, :, :shape.context], p, mode=shape.summary_mode)
    pages = shape.pages
    k = min(shape.budget_pages, pages)
    _, indices_h = ops.topk_relevancy(query_h, summary_h, k, mode=shape.relevancy_mode,
                                      num_pages=torch.full((b,), pages, dtype=torch.int32), sink_pages=1,
                                      recent_pages=1)
    table = CostTable(shape=shape, model_device=model_device)
    kinds = {dev.split(":")[0] for dev in devices}
    on = {}
    for dev in devices:
        target = torch.device(dev)
        t = {name: x.to(target) for name, x in (("keys", keys_h), ("values", values_h), ("query", query_h),
                                                ("lens", lens_h), ("summary", summary_h), ("indices", indices_h))}
        t["token"] = keys_h[:, :, :1].clone().to(target)
        t["lens_step"] = lens_h.clone().to(target)
        on[dev] = t
        keys, lens = t["keys"][:, :, :shape.context], t["lens"]
        can_apply = dev.split(":")[0] != "fpga"
        _time_memory_ops(table, dev, t, shape, kinds, repeats, apply=can_apply)
        # As in the pipeline: the page counts come from the device's lengths at every step.
        table.ops[("relevancy", dev)] = _time(
            lambda: ops.topk_relevancy(t["query"], t["summary"], k, mode=shape.relevancy_mode,
                                       num_pages=(lens + (p - 1)) // p, sink_pages=1, recent_pages=1),
            kinds, repeats)
        table.ops[("gather", dev)] = _time(
            lambda: (ops.gather_retrieve(keys, t["indices"], p, seq_lens=lens),
                     ops.gather_retrieve(t["values"][:, :, :shape.context], t["indices"], p, seq_lens=lens)),
            kinds, repeats)
        if can_apply:
            gathered_k, gathered_lens = ops.gather_retrieve(keys, t["indices"], p, seq_lens=lens)
            gathered_v, _ = ops.gather_retrieve(t["values"][:, :, :shape.context], t["indices"], p, seq_lens=lens)
            row_lens = gathered_lens[:, 0].contiguous()
            table.ops[("apply_gathered", dev)] = _time(
                lambda: ops.sparse_apply(t["query"], gathered_k, gathered_v, None, p, seq_lens=row_lens),
                kinds, repeats)
            table.ops[("dense_attention", dev)] = _time(
                lambda: ops.sparse_apply(t["query"], keys, t["values"][:, :, :shape.context], None, p,
                                         seq_lens=lens), kinds, repeats)
        table.sources[dev] = "measured" + (" (FPGA emulation: host time)" if dev.startswith("fpga") and
                                           _fpga_backend() == "emulation" else "")
    if any(dev.split(":")[0] == "cuda" for dev in devices) and model_device.split(":")[0] == "cuda":
        _calibrate_host_memory(table, shape, keys_h, values_h, on[model_device], kinds, repeats)
    # Copies between every ordered pair of present devices, at the sizes a placement moves.
    samples = {"query": query_h, "indices": indices_h, "kv_token": keys_h[:, :, :1].clone(),
               "summary_page": summary_h[:, :, :1].clone(), "out": query_h}
    gathered = ops.gather_retrieve(keys_h[:, :, :shape.context], indices_h, p, seq_lens=lens_h)[0]
    for src, dst in itertools.permutations(devices, 2):
        for what, tensor in samples.items():
            x = tensor.to(torch.device(src))
            table.copies[(what, src, dst)] = _time(lambda: x.to(torch.device(dst)), kinds, repeats)
        g = gathered.to(torch.device(src))
        table.copies[("gathered", src, dst)] = _time(lambda: (g.to(torch.device(dst)), g.to(torch.device(dst))),
                                                     kinds, repeats)
    return table


def _time_memory_ops(table: CostTable, where: str, t: dict, shape: DecodeShape, kinds, repeats: int,
                     apply: bool = True) -> None:
    """The ops that touch the keys and values where they live (``t["keys"]``, ``t["values"]``), timed
    into ``table.ops[(op, where)]``: the decode write, Prepare of the newest page, in-place Apply."""
    from torch_memops import ops

    p, context = shape.page_size, shape.context
    keys, values, lens = t["keys"][:, :, :context], t["values"][:, :, :context], t["lens"]
    first = (context - 1) // p
    # The token's keys and values written, and the device's lengths advanced (as the pipeline does).
    table.ops[("write_token", where)] = _time(
        lambda: (t["keys"][:, :, context:context + 1].copy_(t["token"]),
                 t["values"][:, :, context:context + 1].copy_(t["token"]),
                 t["lens_step"].add_(1)), kinds, repeats)
    table.ops[("prepare", where)] = _time(
        lambda: ops.prepare_memory_(t["summary"], keys, p, first, mode=shape.summary_mode, seq_lens=lens),
        kinds, repeats)
    if apply:
        table.ops[("apply_sparse", where)] = _time(
            lambda: ops.sparse_apply(t["query"], keys, values, t["indices"], p, seq_lens=lens), kinds, repeats)


def _calibrate_host_memory(table: CostTable, shape: DecodeShape, keys_h, values_h, gpu: dict, kinds,
                           repeats: int) -> None:
    """The GPU's ops on pinned host memory that it reads in place (the ``host`` memory location)."""
    from torch_memops.hf.mapped import device_alias

    device = gpu["keys"].device
    mapped = {**gpu, "keys": device_alias(keys_h.pin_memory(), device),
              "values": device_alias(values_h.pin_memory(), device)}
    _time_memory_ops(table, HOST_MEMORY, mapped, shape, kinds, repeats)
    table.sources[HOST_MEMORY] = f"measured: {device} reading pinned host memory in place"


def config_for_placement(placement: Placement, model_device: str, base):
    """``base`` (a ``MemopsConfig``) running ``placement`` (the model's device spelled ``auto``)."""
    if placement.retrieval == HOST_MEMORY:
        return dataclasses.replace(base, offload="host", placement={})
    placed = {step: (d if d != model_device else "auto") for step, d in placement.as_dict().items()}
    return dataclasses.replace(base, offload=None, placement=placed)


def fit_step_overhead(costs: CostTable, report: dict) -> None:
    """Fit the per-step host overhead and the rest of the model on a profiled run of the placement
    that keeps every step on the model's device (``report``, from :func:`torch_memops.workload.profile_run`).

    A step's overhead is what the run measured per sparse layer beyond the calibrated ops (never
    negative); the rest of the model is the run's, less the dense layers' attention, which the
    prediction adds from its calibrated op.
    """
    m = costs.model_device
    decode = report["phases"]["decode"]
    tokens = max(decode["tokens"], 1)
    costs.step_overhead_s = {}
    base = predict(costs, Placement(m, m, m, m))["per_token_ms"]
    layers = max(costs.shape.sparse_layers, 1)
    for step in MEMORY_STEPS:
        measured = 1e3 * decode["steps_s"][step] / tokens
        costs.step_overhead_s[step] = max(measured - base[step], 0.0) / 1e3 / layers
    dense_s = decode["model_steps_s"].get("dense", 0.0) / tokens
    costs.rest_of_model_s = max(decode["per_token_ms"]["rest_of_model"] / 1e3 - dense_s, 0.0)


def _fpga_backend() -> str:
    try:
        from torch_memops import fpga

        return fpga.backend()
    except Exception:  # noqa: BLE001  (no fpga module or device: nothing to report)
        return "none"


DEFAULT_POWER = {
    "cpu": (15.0, 65.0, "assumed: 15 W idle, 65 W active (no RAPL reading)"),
    "cuda": (75.0, 700.0, "assumed: 75 W idle, 700 W active (H200 board power limit; no NVML reading)"),
}


def default_power(devices: Iterable[str]) -> Dict[str, Tuple[float, float, str]]:
    """Idle and active watts per device: the stated assumptions, and the U55C model for ``fpga``."""
    power = {}
    for dev in devices:
        kind = dev.split(":")[0]
        if kind == "fpga":
            label = "U55C power model" + (" (the emulation's host time stands for the card's)"
                                          if _fpga_backend() == "emulation" else "")
            power[dev] = (U55C_POWER_MODEL.idle_watts, U55C_POWER_MODEL.active_watts, label)
        elif kind in DEFAULT_POWER:
            power[dev] = DEFAULT_POWER[kind]
    return power


def measured_power(report: dict) -> Dict[str, Tuple[float, float, str]]:
    """Average watts per device over a profiled run's decode (NVML / RAPL), as (idle, active) figures.

    The average stands for the active power and idle is taken as 0: the reading already holds it.
    """
    power = {}
    decode_s = report["phases"]["decode"]["time_s"]
    for dev, entry in report["energy"]["by_device"].items():
        if entry["source"] in ("nvml", "rapl") and decode_s:
            watts = entry["phases"]["decode"]["energy_j"] / decode_s
            power[dev.split(":")[0] if dev.startswith("cuda") else dev] = (
                0.0, watts, f"measured: {watts:.1f} W average over the decode ({entry['source']})")
    return power


# -- validation and the report ----------------------------------------------------------------------------


def validate(costs: CostTable, measure: Callable[[Placement], dict], placements_to_run: Sequence[Placement]) -> dict:
    """Predicted against measured ms per decode token for each placement (``measure`` returns a profile report).

    Two errors per placement: of the whole token (``error_pct``) and of its memory processing (the
    four steps, ``memory_error_pct``). The placement that keeps every step on the model's device is
    the one :func:`fit_step_overhead` fitted on (``fitted``: its error shows run-to-run noise, not
    the model); the medians are over the others when there are any.
    """
    rows = []
    m = costs.model_device
    for placement in placements_to_run:
        predicted = predict(costs, placement)["per_token_ms"]
        report = measure(placement)
        measured = report["phases"]["decode"]["per_token_ms"]
        mem_pred = sum(predicted[s] for s in MEMORY_STEPS)
        mem_meas = sum(measured[s] for s in MEMORY_STEPS)
        rows.append({"placement": placement.as_dict(), "predicted_ms": predicted, "measured_ms": measured,
                     "error_pct": 100.0 * (predicted["total"] - measured["total"]) / measured["total"],
                     "memory_error_pct": 100.0 * (mem_pred - mem_meas) / mem_meas if mem_meas > 0 else None,
                     "fitted": placement == Placement(m, m, m, m), "measured_path": report["path"]["decode"]})
    independent = [r for r in rows if not r["fitted"]] or rows

    def median(key):
        values = [abs(r[key]) for r in independent if r[key] is not None]
        return statistics.median(values) if values else None

    def largest(key):
        values = [abs(r[key]) for r in independent if r[key] is not None]
        return max(values) if values else None

    return {"rows": rows, "median_abs_error_pct": median("error_pct"), "max_abs_error_pct": largest("error_pct"),
            "median_abs_memory_error_pct": median("memory_error_pct"),
            "max_abs_memory_error_pct": largest("memory_error_pct"),
            "over": "placements not fitted on" if independent is not rows else "all placements"}


def costs_as_json(costs: CostTable) -> dict:
    return {"shape": dataclasses.asdict(costs.shape), "model_device": costs.model_device,
            "ops_us": {f"{op}@{dev}": 1e6 * v for (op, dev), v in sorted(costs.ops.items())},
            "copies_us": {f"{what}:{src}->{dst}": 1e6 * v for (what, src, dst), v in sorted(costs.copies.items())},
            "rest_of_model_ms": 1e3 * costs.rest_of_model_s,
            "power": {dev: {"idle_w": p[0], "active_w": p[1], "basis": p[2]} for dev, p in costs.power.items()},
            "what_if": {name: m.basis for name, m in costs.models.items()},
            "sources": costs.sources}


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def render_plan(result: dict, top: int = 10) -> str:
    """Ranked placements as a text table, then the validation (if any)."""
    lines = [f"objective: {result['objective']}; {len(result['ranked'])} placements; "
             f"ms per decode token, predicted (* = uses a modelled device, not present)"]
    header = f"{'#':>3}  {'prepare':<8}{'relevancy':<10}{'memory':<8}{'apply':<7}" + "".join(
        f"{s:>10}" for s in (*MEMORY_STEPS, "rest", "total")) + f"{'mem %':>7}{'J/token':>9}"
    lines.append(header)
    for i, row in enumerate(result["ranked"][:top], 1):
        p, t = row["placement"], row["per_token_ms"]
        mark = "" if row["runnable_here"] else "*"
        lines.append(f"{i:>3}{mark:1} {p['prepare']:<8}{p['relevancy']:<10}{p['retrieval']:<8}{p['apply']:<7}"
                     + "".join(f"{t[s]:>10.3f}" for s in (*MEMORY_STEPS, "rest_of_model", "total"))
                     + f"{row['memory_processing_pct']:>7.1f}{row['energy_j_per_token']:>9.3f}")
    validation = result.get("validation")
    if validation:
        lines.append("validation: predicted vs measured ms per decode token (placements that run here)")
        for row in validation["rows"]:
            p = row["placement"]
            mem_p = sum(row["predicted_ms"][s] for s in MEMORY_STEPS)
            mem_m = sum(row["measured_ms"][s] for s in MEMORY_STEPS)
            lines.append(f"  {Placement(**p).label():<58}{' (fitted)' if row['fitted'] else '':<10}"
                         f"total {row['predicted_ms']['total']:8.2f} vs {row['measured_ms']['total']:8.2f} "
                         f"({row['error_pct']:+6.1f} %), steps {mem_p:7.2f} vs {mem_m:7.2f} "
                         f"({_pct(row['memory_error_pct'])})")
        lines.append(f"  median |error| over {validation['over']}: total {_pct(validation['median_abs_error_pct'])}, "
                     f"steps {_pct(validation['median_abs_memory_error_pct'])}")
    for name, basis in result["costs"]["what_if"].items():
        lines.append(f"what-if {name}: {basis}")
    return "\n".join(lines) + "\n"


# -- the `torch-memops plan` command ----------------------------------------------------------------

PLAN_HELP = """\
Rank the placements of the four steps (prepare, relevancy, memory = where keys and values live
and Retrieval runs, apply) over the devices here and what-if devices, by predicted time or energy
per decode token. Costs come from short calibration runs of the real ops at your model's shapes,
the rest of the model from one profiled run; --validate N also runs the N best placements that
can run here and prints predicted against measured.

example (CPU, with the emulated FPGA if built, and a described device):
  torch-memops plan --model smollm2 --context 512 --budget 128 --validate 2 \\
      --what-if name=cxl,bandwidth_gbs=64,link_gbs=32,launch_us=2,idle_w=5,active_w=20
"""


def add_plan_arguments(sub) -> None:
    from torch_memops import workload

    workload.add_common_arguments(sub)
    sub.add_argument("--objective", default="latency", choices=("latency", "energy"),
                     help="rank by predicted ms per decode token (latency) or J per token (energy)")
    sub.add_argument("--devices", default="",
                     help="devices to calibrate, comma separated (default: all present: cpu, cuda, fpga)")
    sub.add_argument("--what-if", action="append", default=[], metavar="SPEC",
                     help="a device that is not here: name=..,bandwidth_gbs=..,link_gbs=.. and optionally "
                          "launch_us, link_latency_us, idle_w, active_w, apply=0|1 (repeatable)")
    sub.add_argument("--no-u55c", action="store_true", help="leave out the U55C what-if model")
    sub.add_argument("--validate", type=int, default=0, metavar="N",
                     help="also measure the N best placements that run here and report the error")
    sub.add_argument("--repeats", type=int, default=5, help="timed calls per calibrated op (median; default 5)")
    sub.add_argument("--top", type=int, default=10, help="placements printed (default 10; JSON has all)")


def plan_command(args) -> dict:
    from torch_memops import workload as wl

    if args.threads:
        torch.set_num_threads(args.threads)
    config = wl.memops_config(args, {})
    dtype = getattr(torch, args.dtype) if args.dtype else None
    work = wl.load_workload(args.model, args.context, args.batch, wl.resolve_device(args.device), dtype,
                            args.num_layers, args.prefill)
    model_dtype = next(work.model.parameters()).dtype
    model_device = work.device.type
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] or present_devices()
    if model_device not in devices:
        devices.insert(0, model_device)
    # The op costs at the cache length halfway through the generated tokens.
    shape = shape_for(work.model.config, config, work.context + args.new_tokens // 2, work.batch, model_dtype)
    costs = calibrate(shape, devices, model_device, repeats=args.repeats)
    baseline = wl.profile_run(work, config, args.new_tokens, label="calibration run (all on the model device)",
                              progress=False)
    fit_step_overhead(costs, baseline)
    costs.power = {**default_power(devices), **measured_power(baseline)}
    if not args.no_u55c:
        costs.models["u55c"] = u55c_model()
    for spec in args.what_if:
        model = parse_device_spec(spec)
        costs.models[model.name] = model
        costs.power[model.name] = (model.idle_watts, model.active_watts, model.basis)
    if "u55c" in costs.models:
        costs.power["u55c"] = (U55C_POWER_MODEL.idle_watts, U55C_POWER_MODEL.active_watts, U55C_POWER_MODEL.basis)
    ranked = rank(costs, args.objective)
    result = {"schema": SCHEMA, "command": "plan", "objective": args.objective, "workload": baseline["workload"],
              "config": baseline["config"], "costs": costs_as_json(costs), "ranked": ranked}
    if args.validate:
        runnable = [Placement(**r["placement"]) for r in ranked if r["runnable_here"]][:args.validate]
        fitted = Placement(model_device, model_device, model_device, model_device)
        if fitted not in runnable:
            runnable.append(fitted)

        def measure(placement: Placement) -> dict:
            return wl.profile_run(work, config_for_placement(placement, model_device, config), args.new_tokens,
                                  label=placement.label())

        result["validation"] = validate(costs, measure, runnable)
    calibrated = ", ".join(f"{d} ({costs.sources.get(d, '')})" for d in devices)
    print(f"{work.name}, context {work.context}, batch {work.batch}, on {work.device}; calibrated: {calibrated}")
    print(render_plan(result, top=args.top), end="")
    return result
