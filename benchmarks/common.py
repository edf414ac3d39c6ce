"""Timing, bytes-moved math and result files shared by the benchmarks.

Every time is the median device time of many runs after warm-up, measured with CUDA events
through ``triton.testing.do_bench`` (which also clears the L2 cache before each run, so that
small working sets are not timed from cache) or, without Triton, with CUDA events directly.
Bandwidth is quoted against the peak measured in the same run by a large device-to-device copy
(bytes read plus bytes written).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# Model attention shapes named in issue 3: (query heads, kv heads, head dim).
MODELS = {
    "llama3-8b": (32, 8, 128),
    "qwen-7to1": (28, 4, 128),
    "llama2-7b": (32, 32, 128),
}


def median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of ``fn`` in milliseconds."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_CPU_FLUSH: Optional[torch.Tensor] = None


def cpu_median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 15) -> float:
    """Median wall time of ``fn`` on the CPU in milliseconds (CPU ops return when done). A 256 MiB
    buffer is written before every timed run (not timed), so that inputs smaller than the last
    level cache are read from memory, as in a decode step that went through the other layers."""
    global _CPU_FLUSH
    if _CPU_FLUSH is None:
        _CPU_FLUSH = torch.empty(256 << 20, dtype=torch.uint8)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _CPU_FLUSH.fill_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cpu_peak_gbps(mib: int = 512) -> float:
    """CPU memory copy bandwidth in GB/s, bytes read plus bytes written (larger than the caches)."""
    src = torch.empty(mib << 20, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    ms = cpu_median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cpu_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "card": f"CPU {model}, {torch.get_num_threads()} threads",
        "driver": "n/a",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def measured_peak_gbps(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def kernel_times_us(fn: Callable[[], object], iters: int = 20) -> dict[str, float]:
    """Mean device time per call of each kernel that ``fn`` launches (torch.profiler), with the
    L2 cache overwritten before every call as ``median_ms`` does (a 256 MiB fill, whose own
    kernel is among the returned names)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.split("(")[0].split("<")[0].replace("void ", "")
            totals[name] = totals.get(name, 0.0) + event.device_time / iters
    return totals


class cuda_switch:
    """Sets one of the extension's MEMOPS_CUDA_* switches (read at every call) for a block, so
    that one run measures both paths, e.g. ``with cuda_switch("MEMOPS_CUDA_TENSOR_CORES", "0")``.
    """

    def __init__(self, name: str, value: str):
        self.name, self.value, self.saved = name, value, None

    def __enter__(self):
        self.saved = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.saved is None:
            del os.environ[self.name]
        else:
            os.environ[self.name] = self.saved


def graph_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it (no host work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def short_kernel_names(times: dict[str, float]) -> dict[str, float]:
    return {name.replace("memops::", ""): round(us, 1) for name, us in times.items()
            if "memops" in name}


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown"
    return {
        "card": props.name,
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class Row:
    """One measured cell: what ran, its median time and what it moves."""

    name: str
    shape: str
    ms: float
    bytes_moved: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def gbps(self) -> Optional[float]:
        return None if self.bytes_moved is None else self.bytes_moved / (self.ms * 1e-3) / 1e9


class Report:
    """Collects rows; writes JSON (for machines) and a Markdown table (for people) after each
    row, so that a run cut short still leaves its results."""

    def __init__(self, title: str, out_dir: Optional[Path] = None, device: str = "cuda"):
        self.title = title
        self.out_dir = Path(out_dir or os.environ.get("MEMOPS_BENCH_OUT", RESULTS_DIR))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.info = cpu_info() if device == "cpu" else device_info()
        self.peak_gbps = cpu_peak_gbps() if device == "cpu" else measured_peak_gbps()
        self.info["measured_copy_gbps"] = round(self.peak_gbps, 1)
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.write()
        gbps = row.gbps()
        bw = "" if gbps is None else f"  {gbps:8.1f} GB/s ({100 * gbps / self.peak_gbps:5.1f} %)"
        extra = "  " + " ".join(f"{k}={v}" for k, v in row.extra.items()) if row.extra else ""
        print(f"{row.shape:<34} {row.name:<34} {row.ms * 1e3:10.1f} us{bw}{extra}", flush=True)
        return row

    def write(self) -> None:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["us"] = round(r.ms * 1e3, 2)
            g = r.gbps()
            if g is not None:
                d["gbps"] = round(g, 1)
                d["pct_of_copy_peak"] = round(100 * g / self.peak_gbps, 1)
            rows.append(d)
        (self.out_dir / f"{self.title}.json").write_text(
            json.dumps({"device": self.info, "rows": rows}, indent=1))
        lines = [f"# {self.title}", "",
                 f"{self.info['card']}, driver {self.info['driver']}, torch {self.info['torch']}, "
                 f"measured copy peak {self.peak_gbps:.0f} GB/s", "",
                 "| shape | what | time (us) | GB/s | % of copy peak | notes |",
                 "|---|---|---:|---:|---:|---|"]
        for d in rows:
            notes = ", ".join(f"{k}={v}" for k, v in d["extra"].items())
            lines.append(f"| {d['shape']} | {d['name']} | {d['us']:.1f} | {d.get('gbps', '')} | "
                         f"{d.get('pct_of_copy_peak', '')} | {notes} |")
        (self.out_dir / f"{self.title}.md").write_text("\n".join(lines) + "\n")
