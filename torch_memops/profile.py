"""Where the time and the energy of a run go: the four memory-processing steps against the model.

:class:`Profiler` is a context manager around any workload (``generate()``, a benchmark loop). The
cache layers of :mod:`torch_memops.hf` report each step to it through the hook that
``docs/profiling.md`` describes (``with profiler.step(phase, name, devices): ...`` and
``profiler.moved(tensor, destination)``); the profiler records, per phase, step, layer and device:

* device time: CUDA (or HIP) events on the current stream of a GPU step, host timers for CPU and
  FPGA steps (the FPGA runtime's calls return when the kernel has finished; it exposes no run
  timestamps, so its steps are timed on the host, and in emulation they are the host's time);
* bytes moved between devices;
* energy per device: NVML's total-energy counter on NVIDIA GPUs, RAPL (``/sys/class/powercap``) on
  the CPU where readable, and for the FPGA a stated power model (:class:`FpgaPowerModel`), labelled
  as a model in every report. Step energy is the device's measured energy of the phase apportioned
  by the step's share of that phase's time on that device.

Token boundaries come from :meth:`Profiler.token_clock` (a logits processor for ``generate()``) or
:meth:`Profiler.mark_token` in a manual loop; they split the run into prefill and decode, and the
"rest of the model" of a phase is its wall time less its four steps. A compiled decode forward
(a captured graph) does not run the hooks: the report then says that the compiled path ran and that
its steps were not observed, instead of showing an eager breakdown.

Examples
--------
>>> from torch_memops.profile import Profiler                             # doctest: +SKIP
>>> with hf.enable(model, config) as session, Profiler() as prof:       # doctest: +SKIP
...     prof.attach(session)
...     model.generate(ids, max_new_tokens=32, logits_processor=[prof.token_clock()])
>>> print(prof.table()); prof.save_json("run.json")                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
import weakref
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Profiler", "EnergyMeter", "NvmlEnergy", "RaplEnergy", "FpgaPowerModel", "U55C_POWER_MODEL",
           "MEMORY_STEPS", "SCHEMA", "render_table", "save_png", "validate_report"]

SCHEMA = "torch_memops.profile/1"
#: The memory-processing steps, in pipeline order.
MEMORY_STEPS = ("prepare", "relevancy", "retrieval", "apply")
#: Steps the hook also reports that are model work: decode attention of the leading dense layers.
MODEL_STEPS = ("dense",)
REST = "rest_of_model"
PHASES = ("prefill", "decode")


# -- energy ---------------------------------------------------------------------------------------


class EnergyMeter:
    """A cumulative energy counter of one device. ``read()`` gives joules since an arbitrary origin.

    ``available`` says whether it can be read; ``reason`` why not, when it cannot.
    """

    source = "none"

    def __init__(self, device: str):
        self.device = device
        self.available = False
        self.reason = "no energy counter"

    def read(self) -> float:
        raise RuntimeError(f"{type(self).__name__} for {self.device}: {self.reason}")


def _nvml_index(device: torch.device) -> Optional[str]:
    """NVML's PCI bus id of a torch CUDA device, or ``None`` when torch does not report it."""
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


class _CtypesNvml:
    """The three NVML calls the meter needs, through the driver's ``libnvidia-ml.so.1`` (no pynvml)."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        import ctypes

        self._ctypes = ctypes
        self._lib = ctypes.CDLL("libnvidia-ml.so.1")

    def _check(self, code: int) -> None:
        if code != 0:
            raise self.NVMLError(f"NVML error {code}")

    def nvmlInit(self):
        self._check(self._lib.nvmlInit_v2())

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str):
        handle = self._ctypes.c_void_p()
        self._check(self._lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), self._ctypes.byref(handle)))
        return handle

    def nvmlDeviceGetHandleByIndex(self, index: int):
        handle = self._ctypes.c_void_p()
        self._check(self._lib.nvmlDeviceGetHandleByIndex_v2(self._ctypes.c_uint(index), self._ctypes.byref(handle)))
        return handle

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:
        value = self._ctypes.c_ulonglong()
        self._check(self._lib.nvmlDeviceGetTotalEnergyConsumption(handle, self._ctypes.byref(value)))
        return value.value


class NvmlEnergy(EnergyMeter):
    """NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules) of a GPU.

    Uses ``pynvml`` (``nvidia-ml-py``) when importable, else the driver's ``libnvidia-ml.so.1``
    through ctypes; needs a Volta or newer GPU. Degrades to ``available = False`` with the reason.
    """

    source = "nvml"

    def __init__(self, device):
        device = torch.device(device)
        super().__init__(str(device))
        try:
            import pynvml
        except ImportError:
            try:
                pynvml = _CtypesNvml()
            except OSError:
                self.reason = "neither pynvml (pip install nvidia-ml-py) nor libnvidia-ml.so.1 is loadable"
                return
        self._pynvml = pynvml
        try:
            pynvml.nvmlInit()
            bus_id = _nvml_index(device) if torch.cuda.is_available() else None
            self._handle = None
            if bus_id is not None:
                try:
                    self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                except pynvml.NVMLError:
                    self._handle = None  # NVML spells the bus id otherwise: fall back to the index
            if self._handle is None:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as error:
            self.reason = f"NVML: {error}"
            return
        self.available = True
        self.reason = ""

    def read(self) -> float:
        if not self.available:
            return super().read()
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


class RaplEnergy(EnergyMeter):
    """The CPU packages' RAPL counters under ``/sys/class/powercap`` (``energy_uj``, wraps handled).

    Counts the whole package, other processes included. Since Linux 5.10 ``energy_uj`` is readable
    by root only; an unreadable or absent counter gives ``available = False`` with the reason.
    """

    source = "rapl"

    def __init__(self, root: str | os.PathLike = "/sys/class/powercap"):
        super().__init__("cpu")
        self._zones: List[Tuple[Path, float]] = []
        root = Path(root)
        if not root.is_dir():
            self.reason = f"{root} does not exist (no powercap driver)"
            return
        for zone in sorted(root.glob("*-rapl:*")):
            if zone.name.count(":") != 1:  # sub-zones (core, uncore, dram) are inside the package
                continue
            try:
                name = (zone / "name").read_text().strip()
                (zone / "energy_uj").read_text()
                top = float((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError) as error:
                self.reason = f"{zone / 'energy_uj'} is not readable ({error.__class__.__name__}: {error})"
                self._zones = []
                return
            if name.startswith("package"):
                self._zones.append((zone / "energy_uj", top))
        if not self._zones:
            self.reason = f"no RAPL package zone under {root}"
            return
        self._last = [float(path.read_text()) for path, _ in self._zones]
        self._total = 0.0
        self.available = True
        self.reason = ""

    def read(self) -> float:
        if not self.available:
            return super().read()
        for i, (path, top) in enumerate(self._zones):
            now = float(path.read_text())
            delta = now - self._last[i]
            self._total += delta if delta >= 0 else delta + top
            self._last[i] = now
        return self._total / 1e6


@dataclasses.dataclass(frozen=True)
class FpgaPowerModel:
    """Energy of an FPGA card that has no sensor read here: a stated model, never a measurement.

    ``E = idle_watts * wall_s + active_watts * busy_s + joules_per_byte * bytes``, where ``busy_s``
    is the time of the steps that ran on the card and ``bytes`` those moved to or from it.
    """

    name: str
    idle_watts: float
    active_watts: float
    joules_per_byte: float
    basis: str

    def energy(self, wall_s: float, busy_s: float, bytes_moved: float) -> float:
        return self.idle_watts * wall_s + self.active_watts * busy_s + self.joules_per_byte * bytes_moved


#: AMD/Xilinx Alveo U55C. The data sheet gives a 150 W maximum board power; the idle figure and the
#: increment while the memops kernels run are assumptions of this model (a card's own reading,
#: ``xbutil examine -r electrical``, replaces them); the per-byte term is 3.9 pJ/bit of HBM2 access
#: (O'Connor et al., MICRO 2017) plus about 5 pJ/bit for PCIe Gen3 transfers.
U55C_POWER_MODEL = FpgaPowerModel(
    name="U55C model", idle_watts=25.0, active_watts=15.0, joules_per_byte=8.0 * (3.9 + 5.0) * 1e-12,
    basis="150 W maximum board power (data sheet); 25 W idle and +15 W while kernels run (assumed); "
          "8.9 pJ/bit moved (HBM2 3.9 pJ/bit, MICRO 2017, + PCIe about 5 pJ/bit)")


# -- timing ---------------------------------------------------------------------------------------


def _is_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def _synchronize(devices: Iterable[torch.device]) -> None:
    for device in devices:
        if _is_gpu(device):
            torch.cuda.synchronize(device)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


_now = time.perf_counter  # one global lookup per call in the hooks


class _Step:
    """The context object of one step: a host timer, or a pair of GPU events, around the body.

    ``cell``: the ``[seconds, calls]`` accumulator of the step's (phase, name, layer, device).
    """

    __slots__ = ("profiler", "cell", "device", "devices", "start", "end", "stream", "t_body", "t_call")

    def __init__(self, profiler: "Profiler", cell: list, device: torch.device, devices, t_call: float):
        self.profiler, self.cell, self.device, self.devices, self.t_call = profiler, cell, device, devices, t_call

    def __enter__(self):
        p = self.profiler
        t0 = self.t_call  # the bookkeeping counts from the hook's call, not from here
        if p.sync:
            _synchronize(self.devices)
            self.start = None
        elif self.device.type == "cuda":
            # One stream lookup per step (torch.cuda.current_stream builds a Stream object, the
            # costliest call of the hook): the end event goes on the stream the start went on.
            self.stream = torch.cuda.current_stream(self.device)
            self.start, self.end = p._event_pair()
            self.start.record(self.stream)
        else:
            self.start = None
        self.t_body = _now()
        p._overhead_s += self.t_body - t0
        return self

    def __exit__(self, *exc):
        p = self.profiler
        t2 = _now()
        if self.start is not None:
            self.end.record(self.stream)
            p._pending.append((self.cell, self.start, self.end))
        else:
            if p.sync:
                _synchronize(self.devices)
                t2 = _now()
            cell = self.cell
            cell[0] += t2 - self.t_body
            cell[1] += 1
        p._overhead_s += _now() - t2
        return False


# What a step returns while nothing is recorded (also inside torch.compile, which can enter it).
_NULL_STEP = contextlib.nullcontext()


class _LayerHook:
    """The profiler as one cache layer sees it: the same hook, with the layer's index attached.

    A step the layer places (its ``devices`` dict names it) is resolved once per profiled run:
    device, accumulator and the devices it touches are kept until the layer's placement dict is
    replaced (a re-initialised cache) or the profiler starts a new run.
    """

    __slots__ = ("profiler", "layer_idx", "_layer", "_memo")

    def __init__(self, profiler: "Profiler", layer_idx: int, layer=None):
        self.profiler, self.layer_idx = profiler, layer_idx
        self._layer = weakref.ref(layer) if layer is not None else None
        self._memo: dict = {}

    def step(self, phase: str, name: str, devices, layer=None):
        p = self.profiler
        # An untimed token (or a graph being compiled) costs this test and nothing else;
        # is_compiling comes first so that a traced graph never reads (and guards on) _timing.
        if _compiling() or not p._timing:
            return _NULL_STEP
        t_call = _now()
        phase = p._token_phase(phase)
        owner = self._layer() if self._layer is not None else None
        placed = getattr(owner, "devices", None)
        memo = self._memo.get((phase, name))
        if memo is None or memo[0] is not placed or memo[1] != p._run:
            if not (isinstance(placed, dict) and name in placed):
                return p._new_step(phase, name, devices, self.layer_idx, owner, t_call)
            devices = tuple(devices) if not isinstance(devices, torch.device) else (devices,)
            device = p._step_device(name, devices, owner)
            memo = (placed, p._run, p._cell((phase, name, self.layer_idx, device)), device, devices)
            self._memo[(phase, name)] = memo
            p._devices_seen.update(devices)
        p._phase = phase
        return _Step(p, memo[2], memo[3], memo[4], t_call)

    def moved(self, tensor: Tensor, destination) -> None:
        self.profiler.moved(tensor, destination)


class _TokenClock:
    """A logits processor that marks a token boundary on the profiler and returns the scores."""

    def __init__(self, profiler: "Profiler"):
        self.profiler = profiler

    def __call__(self, input_ids, scores):
        self.profiler.mark_token()
        return scores


def _progress_bar(total: int, label: str):
    """A rich progress bar (tqdm when rich is missing, nothing when neither is); returns (advance, close)."""
    try:
        from rich.progress import Progress

        progress = Progress(transient=True)
        task = progress.add_task(label, total=total)
        progress.start()
        return (lambda: progress.advance(task)), progress.stop
    except ImportError:
        pass
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, leave=False)
        return (lambda: bar.update(1)), bar.close
    except ImportError:
        return (lambda: None), (lambda: None)


class Profiler:
    """Per-step, per-layer and per-device time, bytes moved and energy of a workload.

    Parameters
    ----------
    sync : bool
        ``False`` (default): GPU steps are timed with events on the current stream, nothing is
        synchronised inside a forward. ``True``: every step synchronises the GPUs it names before
        and after and is timed on the host (exact attribution, slower run).
    energy : bool
        Read NVML / RAPL counters (where they can be read) at the start, at every token boundary and
        at the end.
    fpga_power : FpgaPowerModel
        The model that stands for the FPGA's energy (there is no sensor read through XRT yet).
    label : str
        Name of this configuration in tables and plots.
    progress : int, optional
        Expected token boundaries: shows a progress bar (rich, or tqdm) advanced by each.
    rapl_root : str
        Where the powercap tree is (tests point it at a fake one).
    meters : dict, optional
        Device name -> :class:`EnergyMeter`, instead of the NVML and RAPL meters found.
    sample_every : int or "auto"
        Which decode tokens get the per-step timing (the prefill always does). ``1`` (default):
        every token. ``N``: decode tokens 0, N, 2N, ... . ``"auto"``: token 0, then each next
        token when the time the profiler has cost so far plus the cost of one more timed token
        stays within ``overhead_budget_pct`` of the decode time so far plus one token; the cost
        of a timed token is the larger of its own clock's and the measured difference between
        the timed and the untimed tokens' mean times. Every token
        counts in the decode time and the token count (the token clock is cheap); the decode
        step times are the mean over the timed tokens times the decode tokens, so per-token
        figures are the timed tokens' means and steps + rest still equal the decode time.
        Bytes moved are counted on every token. ``report()["sampling"]`` says what was timed.
    overhead_budget_pct : float
        The share of decode time that ``sample_every="auto"`` allows the profiler (default 2.5,
        half of the 5 % target: its own clock does not see all of its cost).
    """

    def __init__(self, *, sync: bool = False, energy: bool = True, fpga_power: FpgaPowerModel = U55C_POWER_MODEL,
                 label: str = "run", progress: Optional[int] = None, rapl_root: str = "/sys/class/powercap",
                 meters: Optional[Dict[str, EnergyMeter]] = None, sample_every: int | str = 1,
                 overhead_budget_pct: float = 2.5):
        if sample_every != "auto" and (isinstance(sample_every, bool) or not isinstance(sample_every, int)
                                       or sample_every < 1):
            raise ValueError(f"Profiler: sample_every must be an int >= 1 or 'auto', got {sample_every!r}")
        if not (isinstance(overhead_budget_pct, (int, float)) and 0 < overhead_budget_pct < 100):
            raise ValueError(f"Profiler: overhead_budget_pct must be a number in (0, 100), got {overhead_budget_pct!r}")
        self.sample_every = sample_every
        self.overhead_budget_pct = float(overhead_budget_pct)
        self.sync = sync
        self.energy = energy
        self.fpga_power = fpga_power
        self.label = label
        self.progress = progress
        self.rapl_root = rapl_root
        self._given_meters = meters
        self.meters: Dict[str, EnergyMeter] = {}
        self.path: Dict[str, object] = {}
        self._detach: list = []
        self._clocked = False  # a token clock was made: token boundaries mark the phases
        self._reset()

    # -- the hook interface ----------------------------------------------------------------

    def step(self, phase: str, name: str, devices, layer: Optional[int] = None, owner=None):
        """Context manager around one step (``phase`` "prefill"/"decode", ``name`` a step name).

        ``devices``: the devices the step may touch. The step is timed on its own device: the one
        that the layer ``owner`` (a cache layer with a ``devices`` dict) places it on, else the
        first GPU in ``devices``, else the host.
        """
        # is_compiling first: a traced graph then never reads (and guards on) _timing.
        if _compiling() or not self._timing:
            return _NULL_STEP
        return self._new_step(self._token_phase(phase), name, devices, layer, owner, _now())

    def _token_phase(self, phase: str) -> str:
        """With a token clock, the forward before the first token boundary is the prefill, whatever
        the cache calls it: a cache that starts with a prefix runs a one-token first forward, which
        the cache sees as a decode step (without this its steps counted as decode steps of a
        compiled decode that runs no hooks)."""
        return "prefill" if self._clocked and not self._marks else phase

    def _new_step(self, phase: str, name: str, devices, layer, owner, t_call: float) -> _Step:
        devices = tuple(devices) if not isinstance(devices, torch.device) else (devices,)
        device = self._step_device(name, devices, owner)
        self._phase = phase
        self._devices_seen.update(devices)
        return _Step(self, self._cell((phase, name, layer, device)), device, devices, t_call)

    def moved(self, tensor: Tensor, destination) -> None:
        """Count the bytes of ``tensor`` that cross to ``destination`` (nothing when it is already there)."""
        if not self._running or _compiling():
            return
        if not isinstance(destination, torch.device):
            destination = torch.device(destination)
        if tensor.device == destination:
            return
        key = (self._phase, str(tensor.device), str(destination))
        self._bytes[key] = self._bytes.get(key, 0) + tensor.numel() * tensor.element_size()

    # -- attaching to a workload -------------------------------------------------------------

    def for_layer(self, layer_idx: int, layer=None) -> _LayerHook:
        """The hook object for one cache layer: records carry ``layer_idx``."""
        return _LayerHook(self, layer_idx, layer)

    def attach(self, target) -> "Profiler":
        """Attach to a memops cache, a session, or anything with a ``profile`` hook attribute.

        A cache (anything with ``layers``) gets one per-layer hook per layer, so the report has a
        per-layer breakdown and each step is timed on the device its layer places it on. A session
        (anything with ``new_cache``) has each cache it makes from now on attached the same way,
        ``generate()``'s included. Anything else gets the profiler itself as ``target.profile``.
        Everything is detached when the profiler's context exits.
        """
        layers = getattr(target, "layers", None)
        if layers is not None:
            for i, layer in enumerate(layers):
                layer.profile = self.for_layer(getattr(layer, "layer_idx", i), layer)
                self._detach.append(lambda layer=layer: setattr(layer, "profile", None))
        elif callable(getattr(target, "new_cache", None)):
            make = target.new_cache

            def new_cache(*args, **kwargs):
                cache = make(*args, **kwargs)
                self.attach(cache)
                return cache

            target.new_cache = new_cache
            self._detach.append(lambda: target.__dict__.pop("new_cache", None))
        else:
            target.profile = self
            self._detach.append(lambda: setattr(target, "profile", None))
        self._note_path(target)
        return self

    def set_path(self, decode: str, **evidence) -> None:
        """State which decode path ran (``"eager"`` or ``"compiled"``), with evidence for the report."""
        self.path["declared"] = decode
        self.path.update(evidence)

    def token_clock(self) -> _TokenClock:
        """A logits processor for ``generate(..., logits_processor=[...])`` marking each token."""
        self._clocked = True
        return _TokenClock(self)

    def mark_token(self) -> None:
        """A token boundary: the forward that produced one token (for every row) has finished."""
        if not self._running:
            return
        self._sync_all()
        now = _now()
        # Energy is read at the first boundary (the end of the prefill) and at the end of the run,
        # not at every token: a counter read is a driver call (NVML) that a host-bound decode
        # would pay in every token. The last boundary takes the end's reading (see __exit__).
        self._marks.append((now, self._read_energy() if not self._marks else None))
        self._drain()
        self._advance()
        self._overhead_s += _now() - now  # the synchronisation is the token's own wait
        # The token that ended here (decode token len(marks) - 2) and the one that starts.
        finished = len(self._marks) - 2
        if finished < 0:
            self._overhead_first_mark = self._overhead_s
        else:
            spent = self._overhead_s - self._overhead_last_mark
            seconds = now - self._marks[-2][0]
            if self._timing:
                self._timed.append(finished)
                self._timed_cost_s += spent
                self._timed_s += seconds
            else:
                self._untimed_s += seconds
        self._overhead_last_mark = self._overhead_s
        self._phase = "decode"
        self._timing = self._time_next(finished + 1)

    def _time_next(self, token: int) -> bool:
        """Whether decode token ``token`` (0 = the first after the prefill) gets per-step timing."""
        if self.sample_every != "auto":
            return token % self.sample_every == 0
        timed = len(self._timed)
        if not timed:
            return True
        decode_s = self._marks[-1][0] - self._marks[0][0]
        own_s = self._overhead_s - self._overhead_first_mark
        # The cost of timing a token: by the profiler's own clock, or, once there are untimed
        # tokens, by how much longer the timed ones took, whichever is larger (the own clock
        # misses the calls into the hook and any cost that shows only in the device's time).
        cost = self._timed_cost_s / timed
        untimed = token - timed
        if untimed > 0:
            cost = max(cost, self._timed_s / timed - self._untimed_s / untimed)
        spent = max(own_s, timed * cost)
        return spent + cost <= self.overhead_budget_pct / 100.0 * (decode_s + decode_s / token)

    # -- the context --------------------------------------------------------------------------

    def __enter__(self) -> "Profiler":
        self._reset()
        if self.energy:
            self._open_meters()
        self._sync_all()
        self._start = (time.perf_counter(), self._read_energy())
        self._running = self._timing = True
        if self.progress:
            self._advance, self._close_progress = _progress_bar(self.progress, f"profiling {self.label}")
        return self

    def __exit__(self, *exc) -> bool:
        self._sync_all()
        self._end = (time.perf_counter(), self._read_energy())
        if len(self._marks) > 1:
            # The counters at the last boundary, interpolated between the first boundary and the
            # end at the decode's mean power (the reads in between were left out on purpose).
            (t0, e0), (t1, _), (t2, e2) = self._marks[0], self._marks[-1], self._end
            share = (t1 - t0) / (t2 - t0) if t2 > t0 else 1.0
            self._marks[-1] = (t1, {name: e0[name] + share * (e2[name] - e0[name]) for name in e2 if name in e0})
        self._running = self._timing = False
        self._drain()
        self._close_progress()
        for detach in reversed(self._detach):
            detach()
        self._detach = []
        return False

    # -- results --------------------------------------------------------------------------------

    def report(self) -> dict:
        """The run as a JSON-ready dict (schema :data:`SCHEMA`; ``docs/profiling.md`` lists its keys)."""
        if self._end is None:
            raise RuntimeError("Profiler.report: the profiler's context has not been exited yet")
        return _build_report(self)

    def table(self) -> str:
        return render_table([self.report()])

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.report(), indent=2))

    # -- internals --------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._running = False
        self._timing = False  # per-step timing is on (the prefill, and the decode tokens sampled)
        self._timed: List[int] = []  # decode tokens that had it
        self._timed_cost_s = self._timed_s = self._untimed_s = 0.0
        self._overhead_first_mark = self._overhead_last_mark = 0.0
        self._phase = "prefill"
        self._cells: Dict[tuple, list] = {}  # (phase, name, layer, device) -> [seconds, calls]
        self._run = getattr(self, "_run", 0) + 1  # per-layer hooks re-resolve their steps in a new run
        self._bytes: Dict[tuple, int] = {}
        self._pending: list = []
        self._event_pool: list = []
        self._marks: list = []
        self._devices_seen: set = set()
        self._overhead_s = 0.0
        self._start = self._end = None
        self._advance = self._close_progress = lambda: None

    def _note_path(self, target) -> None:
        for attr in ("is_compileable", "compiled", "forward_compiled", "is_compiled"):
            value = getattr(target, attr, None)
            if isinstance(value, bool):
                self.path.setdefault(attr, value)
        caches = [target] + [getattr(target, "cache", None)]
        for cache in caches:
            layers = getattr(cache, "layers", None) or []
            flags = {getattr(layer, "is_compileable", None) for layer in layers} - {None}
            if len(flags) == 1:
                self.path.setdefault("cache_compileable", flags.pop())

    def _step_device(self, name: str, devices: Sequence[torch.device], owner) -> torch.device:
        placed = getattr(owner, "devices", None)
        if isinstance(placed, dict) and name in placed:
            return torch.device(placed[name])
        if name == "dense" and owner is not None and getattr(owner, "model_device", None) is not None:
            return torch.device(owner.model_device)
        for device in devices:
            if _is_gpu(device):
                return device
        return devices[0] if devices else torch.device("cpu")

    def _event_pair(self):
        if self._event_pool:
            return self._event_pool.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _cell(self, key) -> list:
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = [0.0, 0]
        return cell

    @property
    def _seconds(self) -> Dict[tuple, float]:
        """Seconds recorded per (phase, name, layer, device), unscaled."""
        return {key: cell[0] for key, cell in self._cells.items() if cell[1]}

    @property
    def _counts(self) -> Dict[tuple, int]:
        return {key: cell[1] for key, cell in self._cells.items() if cell[1]}

    def _drain(self) -> None:
        """Turn finished event pairs into seconds (called after a synchronisation)."""
        for cell, start, end in self._pending:
            cell[0] += start.elapsed_time(end) / 1e3
            cell[1] += 1
            self._event_pool.append((start, end))
        self._pending = []

    def _gpus(self) -> List[torch.device]:
        gpus = [d for d in self._devices_seen if _is_gpu(d)]
        if not gpus and torch.cuda.is_available() and torch.cuda.is_initialized():
            gpus = [torch.device("cuda", torch.cuda.current_device())]
        return gpus

    def _sync_all(self) -> None:
        _synchronize(self._gpus())

    def _open_meters(self) -> None:
        if self._given_meters is not None:
            self.meters = dict(self._given_meters)
            return
        self.meters = {"cpu": RaplEnergy(self.rapl_root)}
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.meters[f"cuda:{i}"] = NvmlEnergy(torch.device("cuda", i))

    def _read_energy(self) -> Dict[str, float]:
        return {name: meter.read() for name, meter in self.meters.items() if meter.available}


# -- the report -----------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _timing_source(device: str) -> str:
    if device.startswith("cuda"):
        return "GPU events on the current stream"
    if device.startswith("fpga"):
        try:
            from torch_memops import fpga

            runtime = fpga.backend()
        except Exception:  # noqa: BLE001  (any failure: the runtime is unknown)
            runtime = "unknown runtime"
        return f"host timer (FPGA runtime: {runtime}; no run timestamps exposed)"
    return "host timer"


def _build_report(p: Profiler) -> dict:
    start_t, start_e = p._start
    end_t, end_e = p._end
    marks = p._marks
    segments = {}
    if marks:
        segments["prefill"] = (start_t, marks[0][0], start_e, marks[0][1])
        segments["decode"] = (marks[0][0], marks[-1][0], marks[0][1], marks[-1][1])
    decode_tokens = max(len(marks) - 1, 0)
    timed_tokens = len(p._timed)
    # Decode steps were timed on the sampled tokens only: their sums stand for all decode tokens
    # at the sampled tokens' mean (exactly 1 when every token was timed).
    scale = decode_tokens / timed_tokens if timed_tokens and decode_tokens else 1.0

    # seconds[phase][device][step], per layer kept apart
    by_device: Dict[str, Dict[str, Dict[str, float]]] = {}
    per_layer: Dict[str, Dict[str, Dict[str, float]]] = {}
    calls: Dict[str, Dict[str, int]] = {}
    counts = p._counts
    for (phase, name, layer, device), seconds in p._seconds.items():
        if phase == "decode" and scale != 1.0:
            seconds = seconds * scale
        dev = _device_name(device)
        by_device.setdefault(phase, {}).setdefault(dev, {})
        by_device[phase][dev][name] = by_device[phase][dev].get(name, 0.0) + seconds
        if layer is not None:
            entry = per_layer.setdefault(phase, {}).setdefault(str(layer), {})
            entry[name] = entry.get(name, 0.0) + seconds
        calls.setdefault(phase, {})[name] = calls.get(phase, {}).get(name, 0) + counts[(phase, name, layer, device)]

    wall_s = end_t - start_t
    phases = {}
    for phase in PHASES:
        steps = {s: 0.0 for s in MEMORY_STEPS}
        model_steps = {}
        for dev, named in by_device.get(phase, {}).items():
            for name, seconds in named.items():
                target = steps if name in MEMORY_STEPS else model_steps
                target[name] = target.get(name, 0.0) + seconds
        memory_s = sum(steps.values())
        entry = {"steps_s": steps, "memory_processing_s": memory_s, "model_steps_s": model_steps,
                 "step_calls": calls.get(phase, {})}
        if phase in segments:
            t0, t1 = segments[phase][:2]
            time_s = t1 - t0
            entry.update(time_s=time_s, rest_of_model_s=time_s - memory_s,
                         memory_processing_pct=100.0 * memory_s / time_s if time_s > 0 else None)
        else:
            entry.update(time_s=None, rest_of_model_s=None, memory_processing_pct=None)
        phases[phase] = entry
    phases["decode"]["tokens"] = decode_tokens
    if decode_tokens and phases["decode"]["time_s"] is not None:
        d = phases["decode"]
        per_token = {s: 1e3 * v / decode_tokens for s, v in d["steps_s"].items()}
        per_token[REST] = 1e3 * d["rest_of_model_s"] / decode_tokens
        per_token["total"] = 1e3 * d["time_s"] / decode_tokens
        d["per_token_ms"] = per_token
    run_memory = sum(phases[ph]["memory_processing_s"] for ph in PHASES)
    run = {"time_s": wall_s, "memory_processing_s": run_memory, "rest_of_model_s": wall_s - run_memory,
           "memory_processing_pct": 100.0 * run_memory / wall_s if wall_s > 0 else None,
           "outside_tokens_s": (wall_s - (marks[-1][0] - start_t)) if marks else None}

    # path: which decode path ran
    decode_steps_seen = any(phases["decode"]["steps_s"][s] > 0 for s in MEMORY_STEPS) or bool(
        phases["decode"]["model_steps_s"])
    path = dict(p.path)
    declared = path.pop("declared", None)
    if declared is not None:
        decode_path = declared
    elif decode_steps_seen:
        decode_path = "eager"
    elif decode_tokens and any(path.get(k) for k in ("cache_compileable", "is_compileable", "compiled",
                                                     "forward_compiled", "is_compiled")):
        decode_path = "compiled"
    else:
        decode_path = "unknown"
    path.update(decode=decode_path, decode_steps_observed=decode_steps_seen)
    if decode_path == "compiled" and not decode_steps_seen:
        path["note"] = ("the decode forward ran compiled (a captured graph runs no hooks): its time per token "
                        "is measured, its per-step breakdown is not; profile the eager path for the breakdown")
    elif decode_path == "compiled" and decode_steps_seen:
        path["note"] = "steps were reported during compiled decode (graph breaks at the hooks)"

    # bytes moved
    moved = {}
    for (phase, src, dst), n in p._bytes.items():
        route = moved.setdefault(f"{src}->{dst}", {"prefill": 0, "decode": 0})
        route[phase] = route.get(phase, 0) + n
    for route in moved.values():
        route["decode_per_token"] = route["decode"] / decode_tokens if decode_tokens else None

    decode_own_s = p._overhead_last_mark - p._overhead_first_mark if marks else 0.0
    untimed = decode_tokens - timed_tokens
    sampling = {
        "every": p.sample_every,
        "budget_pct": p.overhead_budget_pct if p.sample_every == "auto" else None,
        "decode_tokens": decode_tokens, "timed_tokens": timed_tokens, "timed": list(p._timed),
        "step_scale": scale,
        "timed_token_ms": 1e3 * p._timed_s / timed_tokens if timed_tokens else None,
        "untimed_token_ms": 1e3 * p._untimed_s / untimed if untimed > 0 else None,
        "how": ("per-step timing on the decode tokens listed in 'timed' (the prefill always); every decode "
                "token counts in the decode time; decode step times (steps_s, per_device_s, per_layer_s, "
                "model_steps_s) are the timed tokens' sums times step_scale = decode_tokens / timed_tokens; "
                "step_calls counts the calls timed"),
    }

    devices = sorted({dev for ph in by_device.values() for dev in ph} | set(end_e))
    energy = _energy(p, devices, segments, by_device, moved, wall_s, start_e, end_e, decode_tokens)

    return {
        "schema": SCHEMA,
        "label": p.label,
        "path": path,
        "sync": p.sync,
        "devices": {dev: {"timing": "host timer after synchronisation" if p.sync else _timing_source(dev)}
                    for dev in devices},
        "run": run,
        "phases": phases,
        "per_device_s": by_device,
        "per_layer_s": per_layer,
        "bytes_moved": moved,
        "energy": energy,
        "overhead": {"profiler_s": p._overhead_s,
                     "pct_of_run": 100.0 * p._overhead_s / wall_s if wall_s > 0 else None,
                     "decode_s": decode_own_s,
                     "pct_of_decode": (100.0 * decode_own_s / phases["decode"]["time_s"]
                                       if phases["decode"]["time_s"] else None),
                     "how": "time spent in the profiler's own bookkeeping, host side"},
        "sampling": sampling,
        "torch": torch.__version__,
    }


def _energy(p: Profiler, devices, segments, by_device, moved, wall_s, start_e, end_e, decode_tokens) -> dict:
    measured = {}
    sources, unavailable = {}, {}
    for name, meter in p.meters.items():
        if meter.available and name in end_e:
            sources[name] = meter.source
        else:
            unavailable[name] = meter.reason
    by_device_j: Dict[str, dict] = {}
    for name in sources:
        entry = {"source": sources[name], "total_j": end_e[name] - start_e[name], "phases": {}}
        for phase, (t0, t1, e0, e1) in segments.items():
            phase_j = e1.get(name, 0.0) - e0.get(name, 0.0)
            steps_s = by_device.get(phase, {}).get(name, {})
            time_s = t1 - t0
            mem_s = sum(v for s, v in steps_s.items() if s in MEMORY_STEPS)
            entry["phases"][phase] = {"energy_j": phase_j,
                                      "memory_processing_j": phase_j * mem_s / time_s if time_s > 0 else 0.0}
        by_device_j[name] = entry
    # The FPGA: the stated model, over its busy time and the bytes that crossed to or from it.
    fpga_devices = [d for d in devices if d.startswith("fpga")]
    for name in fpga_devices:
        model = p.fpga_power
        entry = {"source": f"model: {model.name}", "model": dataclasses.asdict(model), "phases": {}}
        total = 0.0
        for phase, (t0, t1, _, _) in segments.items():
            busy = sum(by_device.get(phase, {}).get(name, {}).values())
            nbytes = sum(r.get(phase, 0) for route, r in moved.items() if name in route)
            phase_j = model.energy(t1 - t0, busy, nbytes)
            mem_s = sum(v for s, v in by_device.get(phase, {}).get(name, {}).items() if s in MEMORY_STEPS)
            entry["phases"][phase] = {"energy_j": phase_j,
                                      "memory_processing_j": model.active_watts * mem_s + model.joules_per_byte * nbytes}
            total += phase_j
        entry["total_j"] = total if segments else model.energy(wall_s, sum(
            sum(v.get(name, {}).values()) for v in by_device.values()), 0)
        by_device_j[name] = entry
    total_j = sum(e["total_j"] for e in by_device_j.values())
    memory_j = sum(ph["memory_processing_j"] for e in by_device_j.values() for ph in e["phases"].values())
    decode_j = sum(e["phases"].get("decode", {}).get("energy_j", 0.0) for e in by_device_j.values())
    return {
        "by_device": by_device_j,
        "total_j": total_j if by_device_j else None,
        "memory_processing_j": memory_j if by_device_j else None,
        "memory_processing_pct": 100.0 * memory_j / total_j if total_j > 0 else None,
        "decode_j_per_token": decode_j / decode_tokens if by_device_j and decode_tokens else None,
        "unavailable": unavailable,
        "how": "measured per device over each phase; a step's share is its share of the phase's time on that "
               "device; FPGA figures come from the stated model",
    }


def validate_report(report: dict) -> None:
    """Raise ``ValueError`` if ``report`` lacks a key of the schema or its breakdown does not add up."""
    for key in ("schema", "label", "path", "run", "phases", "per_device_s", "per_layer_s", "bytes_moved",
                "energy", "overhead", "devices"):
        if key not in report:
            raise ValueError(f"profile report: key {key!r} is missing (schema {SCHEMA})")
    if report["schema"] != SCHEMA:
        raise ValueError(f"profile report: schema must be {SCHEMA!r}, got {report['schema']!r}")
    if report["path"].get("decode") not in ("eager", "compiled", "unknown"):
        raise ValueError(f"profile report: path.decode must be eager/compiled/unknown, got {report['path']!r}")
    for phase in PHASES:
        entry = report["phases"][phase]
        if set(entry["steps_s"]) != set(MEMORY_STEPS):
            raise ValueError(f"profile report: phases.{phase}.steps_s must hold {MEMORY_STEPS}, got {entry['steps_s']}")
        if entry["time_s"] is not None:
            total = sum(entry["steps_s"].values()) + entry["rest_of_model_s"]
            if not math.isclose(total, entry["time_s"], rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"profile report: phases.{phase}: steps + rest = {total}, time_s = {entry['time_s']}")
    sampling = report.get("sampling")  # absent from reports written before sampling existed
    if sampling is not None:
        tokens, timed = report["phases"]["decode"]["tokens"], sampling["timed_tokens"]
        if sampling["decode_tokens"] != tokens or timed != len(sampling["timed"]) or not 0 <= timed <= tokens:
            raise ValueError(f"profile report: sampling must time 0..{tokens} of the {tokens} decode tokens and list "
                             f"them, got {sampling}")
        expected = tokens / timed if timed and tokens else 1.0
        if not math.isclose(sampling["step_scale"], expected, rel_tol=1e-12):
            raise ValueError(f"profile report: sampling.step_scale must be decode_tokens / timed_tokens = {expected}, "
                             f"got {sampling['step_scale']}")


# -- output -----------------------------------------------------------------------------------------


def _fmt(value, digits=3, suffix="") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _table_rows(report: dict) -> List[List[str]]:
    decode = report["phases"]["decode"]
    prefill = report["phases"]["prefill"]
    per_token = decode.get("per_token_ms") or {}
    rows = []
    observed = report["path"].get("decode_steps_observed", True) or "baseline" in report["path"]
    for step in MEMORY_STEPS:
        rows.append([step, _fmt(per_token.get(step)) if observed else "not observed",
                     _fmt(1e3 * prefill["steps_s"][step], 1)])
    rows.append([REST.replace("_", " "), _fmt(per_token.get(REST)),
                 _fmt(None if prefill["rest_of_model_s"] is None else 1e3 * prefill["rest_of_model_s"], 1)])
    rows.append(["total", _fmt(per_token.get("total")),
                 _fmt(None if prefill["time_s"] is None else 1e3 * prefill["time_s"], 1)])
    rows.append(["memory processing", _fmt(decode["memory_processing_pct"], 1, " %"),
                 _fmt(prefill["memory_processing_pct"], 1, " %")])
    return rows


def _summary_lines(report: dict) -> List[str]:
    lines = [f"path: decode {report['path']['decode']}"
             + (f" ({report['path']['note']})" if report["path"].get("note") else "")]
    energy = report["energy"]
    if energy["total_j"] is not None:
        parts = [f"{dev} {e['total_j']:.2f} J ({e['source']})" for dev, e in energy["by_device"].items()]
        lines.append("energy: " + ", ".join(parts) + f"; memory processing {_fmt(energy['memory_processing_pct'], 1)} %"
                     + (f"; {energy['decode_j_per_token']:.3f} J per decode token"
                        if energy["decode_j_per_token"] is not None else ""))
    if energy["unavailable"]:
        lines.append("no energy reading: " + "; ".join(f"{d}: {why}" for d, why in energy["unavailable"].items()))
    for dev, phases in sorted(_device_totals(report).items()):
        lines.append(f"{dev}: " + ", ".join(f"{ph} {1e3 * s:.2f} ms in steps" for ph, s in phases.items())
                     + f" [{report['devices'].get(dev, {}).get('timing', '')}]")
    moved = report["bytes_moved"]
    lines.append("bytes moved per decode token: " + (", ".join(
        f"{route} {int(r['decode_per_token'] or 0)}" for route, r in moved.items()) or "none"))
    sampling = report.get("sampling")
    if sampling and sampling["decode_tokens"]:
        every = sampling["every"]
        rule = (f"auto, budget {sampling['budget_pct']:g} % of decode time" if every == "auto"
                else "every token" if every == 1 else f"every {every}th token")
        line = (f"per-step timing: {sampling['timed_tokens']} of {sampling['decode_tokens']} decode tokens ({rule})"
                + (f", decode steps scaled x{sampling['step_scale']:.3g}" if sampling["step_scale"] != 1.0 else ""))
        if sampling["untimed_token_ms"] is not None and sampling["timed_token_ms"] is not None:
            line += (f"; token time timed {sampling['timed_token_ms']:.2f} ms, untimed "
                     f"{sampling['untimed_token_ms']:.2f} ms")
        lines.append(line)
    overhead = report["overhead"]
    lines.append(f"profiler overhead: {1e3 * overhead['profiler_s']:.2f} ms, "
                 f"{_fmt(overhead['pct_of_run'], 2)} % of the run"
                 + (f", {_fmt(overhead['pct_of_decode'], 2)} % of decode" if overhead.get("pct_of_decode") is not None
                    else "") + " (its own clock)")
    return lines


def _device_totals(report: dict) -> Dict[str, Dict[str, float]]:
    totals: Dict[str, Dict[str, float]] = {}
    for phase, devices in report["per_device_s"].items():
        for dev, named in devices.items():
            totals.setdefault(dev, {})[phase] = sum(named.values())
    return totals


def render_table(reports: Sequence[dict], *, use_rich: Optional[bool] = None) -> str:
    """The breakdown of one or more runs as text: a rich table when rich is installed, plain otherwise."""
    headers = ["step (all layers)", "decode ms/token", "prefill ms"]
    out = []
    if use_rich is None:
        try:
            import rich  # noqa: F401

            use_rich = True
        except ImportError:
            use_rich = False
    for report in reports:
        rows = _table_rows(report)
        title = f"{report['label']}: {report['phases']['decode']['tokens']} decode tokens"
        if use_rich:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for i, header in enumerate(headers):
                table.add_column(header, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            buffer = io.StringIO()
            Console(file=buffer, width=100, force_terminal=False, color_system=None).print(table)
            out.append(buffer.getvalue().rstrip())
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
            out.append(title)
            out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
            for row in rows:
                out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        out.extend(_summary_lines(report))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def save_png(reports: Sequence[dict], path: str | os.PathLike) -> None:
    """Stacked bars per configuration: decode ms per token (and J per token where measured).

    Needs matplotlib; raises ``RuntimeError`` that says so when it is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("save_png needs matplotlib (pip install matplotlib)") from error
    labels = [r["label"] for r in reports]
    parts = list(MEMORY_STEPS) + [REST]
    colours = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#bab0ac"]
    with_energy = any(r["energy"]["decode_j_per_token"] is not None for r in reports)
    fig, axes = plt.subplots(1, 2 if with_energy else 1, figsize=(4 + 1.6 * len(reports) * (2 if with_energy else 1), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    bottoms = [0.0] * len(reports)
    for part, colour in zip(parts, colours):
        values = [(r["phases"]["decode"].get("per_token_ms") or {}).get(part) or 0.0 for r in reports]
        ax.bar(labels, values, bottom=bottoms, label=part.replace("_", " "), color=colour)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, r in enumerate(reports):
        pct = r["phases"]["decode"]["memory_processing_pct"]
        if pct is not None:
            ax.text(i, bottoms[i], f"{pct:.0f} %", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title("where decode time goes (label: memory processing share)", fontsize=9)
    ax.legend(fontsize=8)
    if with_energy:
        ax = axes[0][1]
        mem = []
        rest = []
        for r in reports:
            e = r["energy"]
            tokens = r["phases"]["decode"]["tokens"] or 1
            per = e["decode_j_per_token"] or 0.0
            mem_decode = sum(d["phases"].get("decode", {}).get("memory_processing_j", 0.0)
                             for d in e["by_device"].values()) / tokens
            mem.append(mem_decode)
            rest.append(max(per - mem_decode, 0.0))
        ax.bar(labels, mem, label="memory processing", color=colours[1])
        ax.bar(labels, rest, bottom=mem, label=REST.replace("_", " "), color=colours[4])
        ax.set_ylabel("energy per decode token (J)")
        ax.set_title("energy per token (FPGA: model)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
