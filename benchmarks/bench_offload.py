"""Serving KV that does not fit on the GPU: per-token time of ``generate()`` with the keys/values
in host memory (``MemopsConfig(offload="host")`` and ``"host_gather"``) against the all-GPU pipeline and against
transformers' own offloaded cache, with the GPU's memory capped.

Timed as ``benchmarks/bench_e2e.py`` times (its ``Runner``: the time of ``generate()`` for
``1 + n`` new tokens minus that for one, divided by ``n``, median of ``--repeats`` pairs after
warm-up; random weights; the prompt's keys/values are random and written into the cache that
``generate()`` receives). All rows run in one process, in this order (the rows the comparison needs first, so that a run
cut by its deadline still has them). The cap is ``torch.cuda.set_per_process_memory_fraction``
such that the memory the process may use beyond what it holds after loading the weights is the
cell's whole KV (every layer) divided by ``--kv-over-free`` (default 3); rows marked capped run
under it, the others with the fraction back at 1.

- ``gpu-ours``: ``generate()`` in ``hf.enable``, every buffer on the GPU, eager dynamic
  MemopsCache, no cap (the all-GPU pipeline at a size that fits: the H200 holds it uncapped).
- ``offload-ours``: ``MemopsConfig(offload="host")``, same method and budget, eager dynamic
  cache, capped (sparse layers' KV pinned on the host and read in place by the GPU; dense
  leading layers, summaries, Relevancy and Apply on the GPU).
- ``gpu-ours-static`` / ``offload-ours-static``: the same two with the static MemopsCache that
  ``generate(cache_implementation="static")`` auto-compiles (the fastest form of each).
- ``offload-ours-gather``: ``MemopsConfig(offload="host_gather")``, capped (the host gathers the
  selected pages and copies them; dynamic cache only).
- ``offload-hf``: transformers' offloaded cache, capped (``DynamicCache(offloading=True)``, what
  ``cache_implementation="offloaded"`` builds: every layer's KV on the host, the next layer
  prefetched to the GPU on a side stream, dense attention).
- ``gpu-stock``: stock ``generate()``, ``DynamicCache`` on the GPU, no cap.
- ``capped-gpu-stock``: the same under the cap (expected: out of memory: the KV does not fit).

Tokens/s counts every row of the batch: ``batch / seconds per decode step``.

    python benchmarks/bench_offload.py                   # GPU: Llama-3-8B shapes, 16 layers, 4 x 32K
    python benchmarks/bench_offload.py --cpu-smoke       # tiny random Llama on the CPU, no cap

Writes ``bench_offload{--tag}.json`` and ``.md`` to ``--out`` after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from bench_e2e import (LLAMA3_8B, TINY, Cell, RowSpec, Runner, build_model, environment,  # noqa: E402
                       free, kv_bytes_dense, kv_bytes_sparse, parse_cells, weight_bytes)
from common import RESULTS_DIR  # noqa: E402

from torch_memops import hf  # noqa: E402
from torch_memops.workload import fill_random  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class OffloadRow(RowSpec):
    offload: Optional[str] = None  # MemopsConfig.offload of an "ours" row
    hf_offloaded: bool = False     # transformers' offloaded DynamicCache
    capped: bool = False           # runs under the memory cap


ROWS = [
    OffloadRow("gpu-ours", "hf.enable, eager MemopsCache, every buffer on the GPU, no cap", ours=True, static=False),
    OffloadRow("offload-ours", "hf.enable, MemopsConfig(offload='host') (GPU reads host memory in place), eager, "
               "under the cap", ours=True, static=False, offload="host", capped=True),
    OffloadRow("gpu-ours-static", "hf.enable, static MemopsCache, auto-compiled, every buffer on the GPU, no cap",
               ours=True, static=True),
    OffloadRow("offload-ours-static", "hf.enable, MemopsConfig(offload='host'), static MemopsCache, auto-compiled, "
               "under the cap", ours=True, static=True, offload="host", capped=True),
    OffloadRow("offload-ours-gather", "hf.enable, MemopsConfig(offload='host_gather') (host gathers, side-stream "
               "copies), under the cap", ours=True, static=False, offload="host_gather", capped=True),
    OffloadRow("offload-hf", "stock generate(), transformers' offloaded DynamicCache, under the cap", ours=False,
               static=False, hf_offloaded=True, capped=True),
    OffloadRow("gpu-stock", "stock generate(), DynamicCache on the GPU, no cap", ours=False, static=False),
    OffloadRow("capped-gpu-stock", "stock generate(), DynamicCache on the GPU, under the cap", ours=False,
               static=False, capped=True),
]
ROW_NAMES = [row.name for row in ROWS]


def hf_offloaded_cache(model):
    """transformers' offloaded dynamic cache, as this transformers version spells it."""
    from transformers import cache_utils

    if "offloading" in inspect.signature(cache_utils.DynamicCache.__init__).parameters:
        return cache_utils.DynamicCache(config=model.config, offloading=True), "DynamicCache(offloading=True)"
    if hasattr(cache_utils, "OffloadedCache"):
        return cache_utils.OffloadedCache(), "OffloadedCache()"
    raise RuntimeError("this transformers has neither DynamicCache(offloading=...) nor OffloadedCache")


class OffloadRunner(Runner):
    """bench_e2e's Runner, with the offload rows' configs and transformers' offloaded cache."""

    gather_threads: Optional[int] = None  # HostTransfer.threads of the offloaded caches

    def memops_config(self, spec: OffloadRow) -> hf.MemopsConfig:
        return hf.MemopsConfig(method=spec.method, page_size=self.args.page_size, token_budget=self.args.budget,
                               dense_layers=self.args.dense_layers, offload=spec.offload)

    def _cache_factory(self, spec: OffloadRow, cell: Cell, session, max_cache_len: int):
        if not spec.hf_offloaded:
            inner = super()._cache_factory(spec, cell, session, max_cache_len)

            def make():
                if session is not None:
                    # The session holds the previous call's cache until the next forward: drop it
                    # first, or two caches' GPU parts would meet under the cap.
                    session.active_cache = None
                free(self.device)
                kwargs = inner()
                transfer = getattr(kwargs[self.cache_kwarg].layers[-1], "transfer", None)
                if transfer is not None:
                    transfer.threads = self.gather_threads
                return kwargs
            return make
        model = self.model

        def make():
            free(self.device)
            cache, self.hf_cache_name = hf_offloaded_cache(model)
            return {self.cache_kwarg: fill_random(cache, model, cell.batch, cell.context, self.dtype, self.device)}
        return make


def pinned_h2d_gbps(device, mib: int = 256) -> Optional[float]:
    """Host (pinned) -> GPU copy bandwidth, GB/s, median of 5."""
    if device.type != "cuda":
        return None
    host = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    times = []
    for _ in range(6):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    del host, dev
    return round(mib * 2**20 / sorted(times[1:])[2] / 1e9, 1)


def host_gather_gbps(model, args, cell: Cell, dtype) -> dict:
    """GB/s of the host gather of one sparse layer's selected key pages (``index_select`` of
    ``B * Hkv * k`` pages of ``P * D`` elements from one layer's host keys), median of 10, with
    torch's default intra-op threads and with one."""
    config = model.config
    page, budget_pages = args.page_size, args.budget // args.page_size
    pages = -(-(cell.context + 256) // page)
    rows = cell.batch * config.num_key_value_heads
    source = torch.randn(rows * pages, page * config.head_dim).to(dtype)
    index = (torch.arange(rows)[:, None] * pages + torch.randint(0, pages, (rows, budget_pages))).reshape(-1)
    out = torch.empty(index.numel(), source.shape[1], dtype=dtype)
    threads = torch.get_num_threads()
    result = {}
    for count in (threads, 1):
        torch.set_num_threads(count)
        torch.index_select(source, 0, index, out=out)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            torch.index_select(source, 0, index, out=out)
            times.append(time.perf_counter() - start)
        result[f"{count}_threads"] = round(out.numel() * out.element_size() / sorted(times)[5] / 1e9, 2)
    torch.set_num_threads(threads)
    result["bytes"] = out.numel() * out.element_size()
    return result


def planner_prediction(model, args, cell: Cell, dtype, measured: dict, gpu: str = "cuda") -> dict:
    """What torch_memops.plan predicts for the all-GPU and the host-memory placements at this cell
    (memory-processing steps only, from its calibration of the real ops here), next to the measured
    difference of the two rows."""
    from torch_memops import plan

    memops = hf.MemopsConfig(page_size=args.page_size, token_budget=args.budget, dense_layers=args.dense_layers)
    shape = plan.shape_for(model.config, memops, cell.context, cell.batch, dtype)
    costs = plan.calibrate(shape, sorted({"cpu", gpu}), gpu, repeats=3)
    out = {}
    for name, placement in (("all-gpu", plan.Placement(gpu, gpu, gpu, gpu)),
                            ("host-memory", plan.Placement(gpu, gpu, "cpu", gpu))):
        predicted = plan.predict(costs, placement)["per_token_ms"]
        out[name] = {step: round(predicted[step], 3) for step in plan.MEMORY_STEPS}
        out[name]["memory_ms"] = round(sum(predicted[step] for step in plan.MEMORY_STEPS), 3)
    out["predicted_extra_ms"] = round(out["host-memory"]["memory_ms"] - out["all-gpu"]["memory_ms"], 3)
    if measured.get("offload-ours-gather") and measured.get("gpu-ours"):
        out["measured_extra_ms"] = round(measured["offload-ours-gather"] - measured["gpu-ours"], 3)
    out["note"] = ("the planner prices placement prepare=cuda,relevancy=cuda,retrieval=cpu,apply=cuda from its own "
                   "calibration: gather_retrieve on the CPU and synchronous copies of pageable tensors, no overlap; "
                   "offload='host_gather' gathers into pinned staging and overlaps pieces; offload='host' has no host step")
    return out


def write_report(path_json: Path, path_md: Path, result: dict) -> None:
    path_json.write_text(json.dumps(result, indent=1))
    info, cap = result["environment"], result["cap"]
    lines = [
        "# bench_offload: KV in host memory, GPU memory capped", "",
        f"{result['model']}; {info.get('card')}; host CPU {info.get('host_cpu')} ({info.get('host_cpus')} cpus); "
        f"torch {info.get('torch')}, transformers {info.get('transformers')}; pinned host->GPU copy "
        f"{result.get('h2d_pinned_gbps')} GB/s; host gather of one layer's selected key pages "
        f"({result['host_gather_gbps']['bytes'] / 2**20:.1f} MiB, index_select) "
        + ", ".join(f"{v} GB/s with {k.replace('_', ' ')}" for k, v in result["host_gather_gbps"].items()
                    if k != "bytes") + ".", "",
        f"Cell {result['cell']}: KV of every layer {result['kv_gib']:.2f} GiB, weights {result['weights_gib']:.2f} GiB; "
        + (f"cap {cap['cap_gib']:.2f} GiB of {cap['total_gib']:.0f} GiB (fraction {cap['fraction']:.4f}), i.e. "
           f"{cap['allowed_after_weights_gib']:.2f} GiB beyond the weights = KV / {cap['kv_over_free']}."
           if cap.get("fraction") else f"no cap ({cap.get('why', '')})."), "",
        f"Pipeline: {result['pipeline']}; host gather threads {result.get('gather_threads')}. ms per decode step = (t(1+{result['new_tokens']}) - t(1)) / "
        f"{result['new_tokens']}, median of {result['repeats']} pairs after {result['warmup']} warm-up pair(s); "
        f"tokens/s = batch / step time.", "",
        "| row | what | capped | ms/step | tokens/s | vs gpu-ours | vs gpu-stock | peak GPU GiB | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        ms = row["ms_per_token"]
        extra = row["extra"]
        cells = [f"{ms:.2f}" if ms else "", f"{extra['tokens_per_s']:.1f}" if extra.get("tokens_per_s") else "",
                 f"{extra['x_gpu_ours']:.2f}" if extra.get("x_gpu_ours") else "",
                 f"{extra['x_gpu_stock']:.2f}" if extra.get("x_gpu_stock") else "",
                 f"{extra['peak_gpu_gib']:.2f}" if extra.get("peak_gpu_gib") is not None else ""]
        lines.append(f"| {row['row']} | {row['what']} | {extra.get('capped')} | " + " | ".join(cells)
                     + f" | {row['status']} |")
    summary = result.get("summary", {})
    if summary:
        lines += ["", "Summary: " + ", ".join(f"{k} {v}" for k, v in summary.items())]
    if result.get("plan"):
        lines += ["", "Planner (torch_memops.plan, memory-processing ms per token): "
                  + json.dumps(result["plan"])]
    path_md.write_text("\n".join(lines) + "\n")


def summarise(result: dict) -> dict:
    times = {r["row"]: r["ms_per_token"] for r in result["rows"] if r["ms_per_token"] and r["ms_per_token"] > 0}
    tokens = {r["row"]: r["tokens"] for r in result["rows"] if r.get("tokens") is not None}
    batch = result["batch"]
    for row in result["rows"]:
        ms = times.get(row["row"])
        if ms:
            row["extra"]["tokens_per_s"] = round(batch * 1e3 / ms, 2)
            for base in ("gpu-ours", "gpu-stock"):
                if base in times:
                    row["extra"][f"x_{base.replace('-', '_')}"] = round(times[base] / ms, 3)
    summary = {}
    for offloaded, base in (("offload-ours-static", "gpu-ours-static"), ("offload-ours-gather", "gpu-ours")):
        if offloaded in times and base in times:
            key = offloaded.replace("-", "_")
            summary[f"{key}_tokens_per_s_vs_{base.replace('-', '_')}"] = round(times[base] / times[offloaded], 3)
    if "offload-ours-static" in times and "offload-hf" in times:
        summary["offload_ours_static_speedup_vs_offload_hf"] = round(times["offload-hf"] / times["offload-ours-static"], 3)
    if "offload-ours" in times and "gpu-ours" in times:
        summary["offload_ours_tokens_per_s_vs_gpu_ours"] = round(times["gpu-ours"] / times["offload-ours"], 3)
    if "offload-ours" in times and "gpu-stock" in times:
        summary["offload_ours_tokens_per_s_vs_gpu_stock"] = round(times["gpu-stock"] / times["offload-ours"], 3)
    if "offload-ours" in times and "offload-hf" in times:
        summary["offload_ours_speedup_vs_offload_hf"] = round(times["offload-hf"] / times["offload-ours"], 3)
    for name, a, b in (("offload_ours_tokens_equal_gpu_ours", "offload-ours", "gpu-ours"),
                       ("offload_ours_static_tokens_equal_gpu_ours_static", "offload-ours-static", "gpu-ours-static"),
                       ("offload_ours_gather_tokens_equal_gpu_ours", "offload-ours-gather", "gpu-ours"),
                       ("offload_hf_tokens_equal_gpu_stock", "offload-hf", "gpu-stock")):
        if a in tokens and b in tokens:
            summary[name] = tokens[a] == tokens[b]
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="4x32K", help="batch x context (K = 1024), default 4x32K")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the Llama-3-8B-shaped model")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated subset of " + ",".join(ROW_NAMES))
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny random Llama (hidden 128, 4 layers) on the CPU, cell 2x512, budget 128, no cap")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--kv-over-free", type=float, default=3.0,
                        help="the cell's KV (every layer) over the GPU memory allowed beyond the weights")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gather-threads", default="auto",
                        help="intra-op threads of the host gather: 'auto' (1 if the gather measured faster with one "
                             "thread than with torch's default, else the default), 'default', or a number")
    parser.add_argument("--no-plan", action="store_true", help="skip the planner's prediction")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--row-margin", type=float, default=40.0,
                        help="seconds a row needs at least before MEMOPS_BENCH_DEADLINE to start")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("MEMOPS_BENCH_OUT", RESULTS_DIR)))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    shape = LLAMA3_8B
    if args.cpu_smoke:
        shape, args.device = TINY, "cpu"
        args.cell = args.cell if args.cell != "4x32K" else "2x512"
        args.layers = 4 if args.layers == 16 else args.layers
        args.budget = 128 if args.budget == 1024 else args.budget
        args.new_tokens = 4 if args.new_tokens == 8 else args.new_tokens
    args.prefill = "random"
    unknown = set(args.rows.split(",")) - set(ROW_NAMES)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; the rows are {ROW_NAMES}")
    rows = [row for row in ROWS if row.name in args.rows.split(",")]
    (cell,) = parse_cells(args.cell)
    deadline = float(os.environ.get("MEMOPS_BENCH_DEADLINE", "inf"))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8

    info = environment(device)
    model = build_model(shape, args.layers, dtype, device)
    memops = hf.MemopsConfig(page_size=args.page_size, token_budget=args.budget, dense_layers=args.dense_layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = kv_bytes_dense(model.config, cell.batch, cell.context, elem)
    result = {
        "model": ("Llama-3-8B shapes" if shape is LLAMA3_8B else "tiny Llama (CPU smoke)")
                 + f", {args.layers} layers, random weights, {args.dtype}",
        "cell": cell.label, "batch": cell.batch, "context": cell.context, "environment": info,
        "weights_gib": weights / GIB, "kv_gib": kv / GIB,
        "kv_sparse_step_gib": kv_bytes_sparse(model.config, cell.batch, cell.context, elem, memops) / GIB,
        "h2d_pinned_gbps": pinned_h2d_gbps(device),
        "host_gather_gbps": host_gather_gbps(model, args, cell, dtype),
        "pipeline": f"quest, budget {args.budget}, page {args.page_size}, dense_layers {args.dense_layers}",
        "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
        "cap": {}, "rows": [], "skipped": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path_json, path_md = args.out / f"bench_offload{args.tag}.json", args.out / f"bench_offload{args.tag}.md"
    print(f"{info.get('card')} | host {info.get('host_cpu')} | torch {info['torch']} | transformers "
          f"{info['transformers']} | {result['model']} | {cell.label}: KV {kv / GIB:.2f} GiB, weights "
          f"{weights / GIB:.2f} GiB", flush=True)
    runner = OffloadRunner(model, args, device, dtype)
    gather = result["host_gather_gbps"]
    if args.gather_threads == "auto":
        runner.gather_threads = 1 if gather["1_threads"] > gather[f"{torch.get_num_threads()}_threads"] else None
    elif args.gather_threads != "default":
        runner.gather_threads = int(args.gather_threads)
    result["gather_threads"] = runner.gather_threads or torch.get_num_threads()
    free(device)
    fraction = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        held = torch.cuda.memory_reserved(device)
        allowed = kv / args.kv_over_free
        fraction = min((held + allowed) / total, 1.0)
        result["cap"] = {"total_gib": total / GIB, "held_after_weights_gib": held / GIB,
                         "cap_gib": fraction * total / GIB, "allowed_after_weights_gib": allowed / GIB,
                         "fraction": fraction, "kv_over_free": args.kv_over_free}
    else:
        result["cap"] = {"why": "CPU run: torch.cuda.set_per_process_memory_fraction needs CUDA"}
    measured = {}
    cuda_index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == 'cuda' else 0)
    for spec in rows:
        if time.time() > deadline - args.row_margin:
            result["skipped"].append(f"{spec.name}: deadline")
            print(f"{spec.name:<18} skipped: deadline", flush=True)
            continue
        if fraction is not None:
            free(device)
            torch.cuda.set_per_process_memory_fraction(fraction if spec.capped else 1.0, cuda_index)
        if spec.hf_offloaded and device.type != "cuda":
            row = bench_e2e.RowResult(cell.label, spec.name, spec.what, status="skipped: transformers' offloaded "
                                      "cache needs CUDA streams")
        else:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = runner.run(spec, cell)
            if device.type == "cuda":
                row.extra["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        row.extra["capped"] = spec.capped and fraction is not None
        if spec.hf_offloaded:
            row.extra["hf_cache"] = getattr(runner, "hf_cache_name", None)
        if row.ms_per_token:
            measured[spec.name] = row.ms_per_token
        result["rows"].append(row.__dict__)
        result["summary"] = summarise(result)
        write_report(path_json, path_md, result)
        ms = "" if row.ms_per_token is None else f"{row.ms_per_token:8.2f} ms/step"
        print(f"{spec.name:<18} {ms} warm-up {row.warmup_s} s {row.status}", flush=True)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(1.0, cuda_index)
    free(device)
    if device.type == "cuda" and not args.no_plan and time.time() < deadline - args.row_margin:
        try:
            result["plan"] = planner_prediction(model, args, cell, dtype, measured)
        except Exception as error:  # the prediction must not lose the measured table
            result["plan"] = {"error": f"{type(error).__name__}: {str(error)[:200]}",
                              "traceback": traceback.format_exc(limit=3)[-800:]}
    write_report(path_json, path_md, result)
    print(path_md.read_text(), flush=True)
    return result


if __name__ == "__main__":
    main()
