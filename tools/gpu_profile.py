"""The GPU evidence of docs/profiling.md in one process (run by tools/gpu_profile.sh).

Loads the Llama 3.1 8B architecture with random weights once (bf16, on the GPU), then:
1. profiles dense (transformers' attention) and the memops pipeline (quest, every step on the GPU)
   at each context of --contexts and batch of --batches: ms per decode token by step, the
   memory-processing share, NVML energy per decode token;
2. runs the planner at the first context (devices: --plan-devices) and validates its best
   placements that run here against profiled runs.
Every measured configuration is preceded by one unreported warm-up generate() of the same length
(each report's "warmup" says so); per-step timing is on the decode tokens that the profiler's
overhead budget allows (--sample-every, default auto; each report's "sampling"), and the profiler's
overhead is measured against unprofiled runs (5 alternated pairs, median and spread).
Each row says which decode path ran (eager: step hooks ran; compiled: a captured graph).
Writes profile_<context>_<batch>.json, plan.json and summary.md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from torch_memops import hf, plan, workload
from torch_memops.profile import render_table, save_png


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _timed(report: dict) -> str:
    sampling = report.get("sampling") or {}
    return f"{sampling.get('timed_tokens', '?')}/{sampling.get('decode_tokens', '?')}"


def _ms(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def spin_up(device, seconds: float = 3.0) -> None:
    """Keep the GPU busy for a few seconds before the first measured configuration, so that it does
    not pay the clocks' ramp from idle (the first run of an earlier session, dense at 8K, was the
    slowest dense row even after its own warm-up)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def ratio_lines(rows: list) -> list:
    """Per cell: the cheapest dense row (time and energy per decode token, each its own best) over
    the pipeline's row."""
    lines = []
    for key in dict.fromkeys((r["context"], r["batch"]) for r in rows):
        cell = [r for r in rows if (r["context"], r["batch"]) == key]
        dense = [r for r in cell if r["dense"]]
        ours = [r for r in cell if not r["dense"]]
        if not dense or not ours:
            continue
        quest = ours[-1]
        time_best = min(dense, key=lambda r: r["decode_ms_per_token"]["total"])
        text = (f"{_tokens(key[0])} x{key[1]}: best dense {time_best['decode_ms_per_token']['total']:.2f} ms/token "
                f"({time_best['path']}) / quest {quest['decode_ms_per_token']['total']:.2f} ms/token "
                f"({quest['path']}) = {time_best['decode_ms_per_token']['total'] / quest['decode_ms_per_token']['total']:.2f}x")
        energies = [r for r in dense if r["energy_j_per_decode_token"]]
        if energies and quest["energy_j_per_decode_token"]:
            energy_best = min(energies, key=lambda r: r["energy_j_per_decode_token"])
            text += (f"; energy: best dense {energy_best['energy_j_per_decode_token']:.3f} J/token "
                     f"({energy_best['path']}) / quest {quest['energy_j_per_decode_token']:.3f} J/token = "
                     f"{energy_best['energy_j_per_decode_token'] / quest['energy_j_per_decode_token']:.2f}x less")
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--plan-devices", default="cuda,cpu,fpga")
    parser.add_argument("--validate", type=int, default=3, help="best-ranked runnable placements to measure, besides "
                        "the ones the issue names (all on the GPU; KV on the CPU + GPU apply; FPGA + GPU apply)")
    parser.add_argument("--path", choices=("eager", "compiled"), default="eager",
                        help="the pipeline's generate(): eager dynamic cache, or the static cache auto-compiled")
    parser.add_argument("--dense-paths", default="eager",
                        help="the dense baseline's paths, e.g. eager,compiled (compiled: transformers' StaticCache "
                             "auto-compiled; the cheaper of the two is the baseline to beat)")
    parser.add_argument("--prefill", choices=workload.PREFILLS, default="real",
                        help="random: the cache starts with random keys/values (no prefill; for cells whose eager "
                             "prefill does not fit, e.g. 4 x 128K)")
    parser.add_argument("--no-plan", action="store_true")
    parser.add_argument("--model", default="llama-8b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which no new stage starts")
    parser.add_argument("--sample-every", type=workload.sample_every_argument, default="auto",
                        help="per-step timing on every N-th decode token, or auto (default)")
    parser.add_argument("--overhead-repeats", type=int, default=5, help="alternated pairs of the overhead measurement (0: not measured)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    work = workload.load_workload(args.model, contexts[0], 1, args.device, num_layers=args.num_layers)
    dev = work.device.type
    dtype = next(work.model.parameters()).dtype
    print(f"model: {work.name}, loaded in {time.time() - t0:.1f} s; every configuration below is measured after "
          f"one unreported warm-up run of the same length", flush=True)
    if dev == "cuda":
        spin_up(work.device)
    config = hf.MemopsConfig(method="quest", page_size=16, token_budget=args.budget, dense_layers=2)
    config = dataclasses.replace(config, token_budget=min(args.budget, max(contexts[0] // 2, 64)))
    rows, reports, overhead_lines = [], [], []
    for context in contexts:
        for batch in batches:
            if args.deadline and time.time() > args.deadline:
                print(f"skipped {context}x{batch}: deadline", flush=True)
                continue
            ids = torch.randint(0, work.model.config.vocab_size, (1, context),
                                generator=torch.Generator().manual_seed(0)).expand(batch, -1).contiguous().to(dev)
            cell = workload.Workload(work.model, ids, work.name, work.device, args.prefill)
            pair = []
            runs = [("dense" + ("" if path == "eager" else f" {path}"), None, path)
                    for path in args.dense_paths.split(",")] + [("quest", config, args.path)]
            for label, cfg, path in runs:
                report = workload.profile_run(cell, cfg, args.new_tokens, label=f"{label} {_tokens(context)} x{batch}",
                                              path=path, sample_every=args.sample_every)
                pair.append(report)
                row = workload.summary_row(report)
                row.update(context=context, batch=batch, timed=_timed(report), warmup=report["warmup"]["runs"],
                           dense=cfg is None)
                rows.append(row)
                print(f"{row['label']} [{row['path']}, warm-up {report['warmup']['seconds']:.1f} s not reported, "
                      f"steps timed on {row['timed']} tokens]: {row['decode_ms_per_token']['total']:.2f} ms/token, "
                      f"memory {row['memory_processing_pct_time']:.1f} %, "
                      f"{row['energy_j_per_decode_token'] or float('nan'):.3f} J/token", flush=True)
            if context == contexts[0] and batch == batches[0] and args.overhead_repeats > 0:
                for every in dict.fromkeys([args.sample_every, 1]):  # also the cost of timing every token
                    overhead = workload.measured_overhead(cell, config, args.new_tokens, repeats=args.overhead_repeats,
                                                          path=args.path, sample_every=every)
                    pair[-1].setdefault("measured_overhead_by_sampling", {})[str(every)] = overhead
                    if every == args.sample_every:
                        pair[-1]["measured_overhead"] = overhead
                    overhead_lines.append(
                        f"measured profiler overhead at {_tokens(context)} x{batch}, sample_every={every}: "
                        f"{overhead['overhead_pct']:+.1f} % (median of {overhead['repeats']} pairs, spread "
                        f"{overhead['spread_pct'][0]:+.1f} to {overhead['spread_pct'][1]:+.1f} %, fastest against "
                        f"fastest {overhead['ratio_of_minima_pct']:+.1f} %; timed tokens "
                        f"{overhead['sampling']['timed_tokens']} of {overhead['sampling']['decode_tokens']})")
                    print(f"measured profiler overhead, sample_every={every}: {overhead['overhead_pct']:+.1f} % of "
                          f"decode time per token (median of {overhead['repeats']} alternated pairs after a warm-up, "
                          f"spread {overhead['spread_pct'][0]:+.1f} to {overhead['spread_pct'][1]:+.1f} %; "
                          f"fastest against fastest {overhead['ratio_of_minima_pct']:+.1f} %; ms/token "
                          f"plain {_ms(overhead['plain_ms_per_token'])}, profiled "
                          f"{_ms(overhead['profiled_ms_per_token'])}; timed tokens "
                          f"{overhead['sampling']['timed_tokens']} of {overhead['sampling']['decode_tokens']})",
                          flush=True)
            (args.out / f"profile_{context}_{batch}.json").write_text(json.dumps(pair, indent=1))
            reports.extend(pair)
            if dev == "cuda":
                torch.cuda.empty_cache()
    (args.out / "profile_tables.txt").write_text(render_table(reports))
    try:
        save_png(reports, args.out / "breakdown.png")
    except RuntimeError as error:
        print(f"no PNG: {error}")

    plan_result = None
    if not args.no_plan and (not args.deadline or time.time() < args.deadline - 60):
        context = contexts[0]
        ids = torch.randint(0, work.model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(0)).to(dev)
        cell = workload.Workload(work.model, ids, work.name, work.device)
        present = plan.present_devices()
        devices = [d for d in args.plan_devices.split(",") if d and d.split(":")[0] in present]
        print(f"planner devices: {devices} (asked {args.plan_devices}, present {present})", flush=True)
        shape = plan.shape_for(work.model.config, config, context + args.new_tokens // 2, 1, dtype)
        costs = plan.calibrate(shape, devices, dev, repeats=10)
        fit_report = workload.profile_run(cell, config, args.new_tokens, label="fit", sample_every=args.sample_every)
        plan.fit_step_overhead(costs, fit_report)
        costs.power = {**plan.default_power(devices), **plan.measured_power(fit_report)}
        costs.models["u55c"] = plan.u55c_model()
        costs.power["u55c"] = (plan.U55C_POWER_MODEL.idle_watts, plan.U55C_POWER_MODEL.active_watts, "U55C model")
        ranked = plan.rank(costs)
        runnable = [plan.Placement(**r["placement"]) for r in ranked if r["runnable_here"]][:args.validate]
        # The placements the issue names, whatever their rank: all on the GPU (the one the step
        # overhead is fitted on), the KV on the CPU with GPU apply, memory processing on the FPGA.
        named = [plan.Placement(dev, dev, dev, dev), plan.Placement(dev, dev, "cpu", dev)]
        if "fpga" in devices:
            named.append(plan.Placement("fpga", "fpga", "fpga", dev))
        if costs.has_host_memory():  # the KV in pinned host memory read in place: offload="host"
            named.append(plan.Placement(dev, dev, plan.HOST_MEMORY, dev))
        for placement in named:
            if placement not in runnable:
                runnable.append(placement)

        def measure(placement):
            start = time.time()  # the planner's own config (fitted and calibrated on), placed
            report = workload.profile_run(cell, plan.config_for_placement(placement, dev, config), args.new_tokens,
                                          label=placement.label(), sample_every=args.sample_every)
            print(f"validated {placement.label()}: measured {report['phases']['decode']['per_token_ms']['total']:.2f} "
                  f"ms/token ({time.time() - start:.0f} s)", flush=True)
            return report

        plan_result = {"ranked": ranked, "costs": plan.costs_as_json(costs), "objective": "latency"}
        (args.out / "plan.json").write_text(json.dumps(plan_result, indent=1))  # kept if validation is cut short
        print(f"planner ranked {len(ranked)} placements; validating {[p.label() for p in runnable]}", flush=True)
        plan_result["validation"] = plan.validate(costs, measure, runnable)
        (args.out / "plan.json").write_text(json.dumps(plan_result, indent=1))

    lines = ["every row after one unreported warm-up run; path: the decode path that ran; timed: decode tokens "
             "with per-step timing",
             "| context | batch | config | path | timed | decode ms/token | prepare | relevancy | retrieval | apply | "
             "rest | memory % | J/token (NVML) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = row["decode_ms_per_token"]
        energy = row["energy_j_per_decode_token"]
        lines.append(f"| {row['context']} | {row['batch']} | {row['label'].split()[0]} | {row['path']} | "
                     f"{row['timed']} | {t['total']:.2f} | "
                     f"{t['prepare']:.2f} | {t['relevancy']:.2f} | {t['retrieval']:.2f} | {t['apply']:.2f} | "
                     f"{t['rest_of_model']:.2f} | {row['memory_processing_pct_time']:.1f} | "
                     f"{'-' if energy is None else f'{energy:.3f}'} |")
    lines.extend(ratio_lines(rows))
    lines.extend(overhead_lines)
    if plan_result is not None:
        lines.append("")
        lines.append(plan.render_plan(plan_result, top=8))
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
