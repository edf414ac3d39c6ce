"""Where the time of a ``generate()`` decode token goes, per row of ``bench_e2e.py``.

For each (cell, row): the row's warm-up as ``bench_e2e`` runs it (which compiles), then one
``generate()`` of ``1 + n`` tokens under ``torch.profiler``. Reported per generated token: wall
time, GPU-busy time (the sum of kernel durations; overlap between streams is not subtracted),
kernel launches, CUDA-graph launches, host<->device copies, and the kernels that took the most
time. ``wall - busy`` is time the GPU waited for the host. The inductor/cudagraph perf hints
(e.g. "skipping cudagraphs due to ...") are logged to stderr.

    python benchmarks/trace_e2e.py --cells 8x32K,1x32K --rows stock-static,ours-compiled
    python benchmarks/trace_e2e.py --cpu-smoke            # tiny Llama on the CPU (host timers)

Writes ``trace_e2e{--tag}.json`` and ``.md`` to ``--out``. A diagnostic, not a benchmark: the
profiler adds host overhead; compare its per-token wall with bench_e2e's ms/token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from common import RESULTS_DIR  # noqa: E402


def kernel_summary(prof, tokens: int, top: int) -> dict:
    """Kernel time, launch counts and the top kernels of a profile, per token."""
    kernels, graph_launches, copies, launches = {}, 0, 0, 0
    for event in prof.events():
        name = event.name
        if event.device_type == torch.autograd.DeviceType.CUDA:
            stats = kernels.setdefault(name, [0.0, 0])
            stats[0] += event.device_time
            stats[1] += 1
        elif name in ("cudaGraphLaunch", "cuGraphLaunch"):
            graph_launches += 1
        elif name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")):
            launches += 1
        elif name.startswith("cudaMemcpy"):
            copies += 1
    busy_us = sum(t for t, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_busy_ms_per_token": busy_us / 1e3 / tokens,
        "kernels_per_token": sum(c for _, c in kernels.values()) / tokens,
        "host_kernel_launches_per_token": launches / tokens,
        "graph_launches_per_token": graph_launches / tokens,
        "memcpy_calls_per_token": copies / tokens,
        "top_kernels": [{"name": name[:120], "ms_per_token": t / 1e3 / tokens, "calls_per_token": c / tokens}
                        for name, (t, c) in ranked],
    }


class TracingRunner(bench_e2e.Runner):
    """bench_e2e's Runner whose timing step is one profiled generate() after the warm-up."""

    top = 12

    def _time(self, spec, cell, session, inputs, compile_kwargs, max_cache_len, result):
        timed = self._caller(spec, cell, session, inputs, compile_kwargs, max_cache_len)
        n = self.args.new_tokens

        def call(new_tokens):
            return timed(new_tokens)[0]

        for _ in range(max(1, self.args.warmup)):
            call(1 + n)
            call(1)
        result.compiled = "_compiled_call" in self.model.__dict__
        t1 = min(call(1) for _ in range(2))
        tn = min(call(1 + n) for _ in range(2))
        result.ms_per_token = 1e3 * (tn - t1) / n
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            wall = call(1 + n)
        result.extra.update(kernel_summary(prof, 1 + n, self.top))
        result.extra["profiled_wall_ms_per_token"] = 1e3 * wall / (1 + n)


def write(path: Path, result: dict) -> None:
    path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# trace_e2e: {result['model']}; {result['card']}; torch {result['torch']}", "",
             "Per generated token (profiled generate() of 1+n tokens; ms/token unprofiled as bench_e2e "
             "computes it from t(1+n) - t(1), best of 2):", "",
             "| cell | row | ms/token | profiled wall ms | GPU busy ms | kernels | host launches | graph launches | "
             "memcpy | status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        e = row["extra"]
        ms = "" if row["ms_per_token"] is None else f"{row['ms_per_token']:.2f}"
        if "gpu_busy_ms_per_token" in e:
            lines.append(f"| {row['cell']} | {row['row']} | {ms} | {e['profiled_wall_ms_per_token']:.2f} | "
                         f"{e['gpu_busy_ms_per_token']:.2f} | {e['kernels_per_token']:.0f} | "
                         f"{e['host_kernel_launches_per_token']:.0f} | {e['graph_launches_per_token']:.1f} | "
                         f"{e['memcpy_calls_per_token']:.1f} | {row['status']} |")
        else:
            lines.append(f"| {row['cell']} | {row['row']} | {ms} | | | | | | | {row['status']} |")
    for row in result["rows"]:
        kernels = row["extra"].get("top_kernels")
        if kernels:
            lines += ["", f"## {row['cell']} {row['row']}: top kernels (ms per token, calls per token)", ""]
            lines += [f"- {k['ms_per_token']:.3f} ms, {k['calls_per_token']:.0f}x: `{k['name']}`" for k in kernels]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="8x32K,1x32K")
    parser.add_argument("--rows", default="stock-static,ours-compiled,ours-dense-compiled,ours-eager")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("MEMOPS_BENCH_OUT", RESULTS_DIR)))
    parser.add_argument("--tag", default="")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per row, by time")
    args = parser.parse_args(argv)
    args.prefill, args.repeats = "random", 1
    shape, device = bench_e2e.LLAMA3_8B, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_smoke:
        shape, device = bench_e2e.TINY, torch.device("cpu")
        args.layers, args.budget, args.new_tokens = 4, 128, 2
        if args.cells == parser.get_default("cells"):
            args.cells = "2x512"
    if device.type == "cuda":
        torch._logging.set_logs(perf_hints=True)
    deadline = float(os.environ.get("MEMOPS_BENCH_DEADLINE", "inf"))
    dtype = torch.bfloat16
    model = bench_e2e.build_model(shape, args.layers, dtype, device)
    rows = {spec.name: spec for spec in bench_e2e.ROWS}
    runner = TracingRunner(model, args, device, dtype)
    runner.top = args.top
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    result = {"model": f"Llama shapes {shape['hidden_size']} hidden, {args.layers} layers, random bf16, "
                       f"quest budget {args.budget} page {args.page_size}",
              "card": card, "torch": torch.__version__, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"trace_e2e{args.tag}.md"
    for cell in bench_e2e.parse_cells(args.cells):
        for name in args.rows.split(","):
            if time.time() > deadline - 60:
                print(f"{cell.label} {name}: skipped (deadline)", flush=True)
                continue
            row = runner.run(rows[name], cell)
            result["rows"].append(row.__dict__)
            write(path, result)
            e = row.extra
            print(f"{cell.label:<9} {name:<20} {row.ms_per_token or 0:7.2f} ms/token, busy "
                  f"{e.get('gpu_busy_ms_per_token', 0):.2f} ms, {e.get('kernels_per_token', 0):.0f} kernels, "
                  f"{e.get('graph_launches_per_token', 0):.1f} graphs {row.status}", flush=True)
    print(path.read_text())
    return result


if __name__ == "__main__":
    main()
