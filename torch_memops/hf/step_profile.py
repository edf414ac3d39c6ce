"""``StepProfile``: wall time of the four steps and bytes moved between devices, for a run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Tuple

import torch
from torch import Tensor

from .config import STEPS


class StepProfile:
    """Wall time of the four steps and bytes moved between devices, summed over a run.

    Attach one to a cache (``cache.profile = StepProfile()``) or to single layers
    (``layer.profile``). ``"dense"`` is the decode attention of the leading dense layers;
    ``"retrieval"`` appears only when Apply runs on another device than the memory (otherwise it
    is fused into ``"apply"``). Timing synchronises CUDA devices around each step, so a profiled
    run is slower than an unprofiled one; it shows where the time goes, not the fastest time.
    Prefill work is kept apart from decode work.
    """

    def __init__(self):
        self.seconds: Dict[Tuple[str, str], float] = {}
        self.bytes_moved: Dict[Tuple[str, str, str], int] = {}

    @contextmanager
    def step(self, phase: str, name: str, devices):
        synchronize(devices)
        start = time.perf_counter()
        yield
        synchronize(devices)
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


def synchronize(devices) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class _NoProfile:
    """Stands in for a profiler when none is attached: costs a context manager and nothing else."""

    @contextmanager
    def step(self, phase, name, devices):
        yield

    def moved(self, tensor, destination):
        pass


NO_PROFILE = _NoProfile()
