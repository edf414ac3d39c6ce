"""The GPU evidence of docs/profiling.md in one process (run by tools/gpu_profile.sh).

Loads the Llama 3.1 8B architecture with random weights once (bf16, on the GPU), then:
1. profiles dense (transformers' attention) and the memops pipeline (quest, every step on the GPU)
   at each context of --contexts and batch of --batches: ms per decode token by step, the
   memory-processing share, NVML energy per decode token;
2. runs the planner at the first context (devices: --plan-devices) and validates its best
   placements that run here against profiled runs.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--plan-devices", default="cuda,cpu")
    parser.add_argument("--validate", type=int, default=3, help="best-ranked runnable placements to measure, besides "
                        "the ones the issue names (all on the GPU; KV on the CPU + GPU apply; FPGA + GPU apply)")
    parser.add_argument("--path", choices=("eager", "compiled"), default="eager",
                        help="the pipeline's generate(): eager dynamic cache, or the static cache auto-compiled")
    parser.add_argument("--no-plan", action="store_true")
    parser.add_argument("--model", default="llama-8b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which no new stage starts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    work = workload.load_workload(args.model, contexts[0], 1, args.device, num_layers=args.num_layers)
    dev = work.device.type
    dtype = next(work.model.parameters()).dtype
    print(f"model: {work.name}, loaded in {time.time() - t0:.1f} s", flush=True)
    config = hf.MemopsConfig(method="quest", page_size=16, token_budget=args.budget, dense_layers=2)
    config = dataclasses.replace(config, token_budget=min(args.budget, max(contexts[0] // 2, 64)))
    rows, reports = [], []
    for context in contexts:
        for batch in batches:
            if args.deadline and time.time() > args.deadline:
                print(f"skipped {context}x{batch}: deadline", flush=True)
                continue
            ids = torch.randint(0, work.model.config.vocab_size, (1, context),
                                generator=torch.Generator().manual_seed(0)).expand(batch, -1).contiguous().to(dev)
            cell = workload.Workload(work.model, ids, work.name, work.device)
            pair = []
            for label, cfg in (("dense", None), ("quest", config)):
                report = workload.profile_run(cell, cfg, args.new_tokens, label=f"{label} {_tokens(context)} x{batch}",
                                              path="eager" if cfg is None else args.path)
                pair.append(report)
                row = workload.summary_row(report)
                row.update(context=context, batch=batch)
                rows.append(row)
                print(f"{row['label']}: {row['decode_ms_per_token']['total']:.2f} ms/token, memory "
                      f"{row['memory_processing_pct_time']:.1f} %, "
                      f"{row['energy_j_per_decode_token'] or float('nan'):.3f} J/token", flush=True)
            if context == contexts[0] and batch == batches[0]:
                overhead = workload.measured_overhead(cell, config, args.new_tokens, repeats=3)
                pair[-1]["measured_overhead"] = overhead
                print(f"measured profiler overhead: {overhead['overhead_pct']:+.1f} % of decode time per token "
                      f"(plain {overhead['plain_ms_per_token']}, profiled {overhead['profiled_ms_per_token']})",
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
        fit_report = workload.profile_run(cell, config, args.new_tokens, label="fit")
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
            cfg = plan.config_for_placement(placement, dev, method="quest", page_size=16, token_budget=args.budget,
                                            dense_layers=2)
            return workload.profile_run(cell, cfg, args.new_tokens, label=placement.label())

        plan_result = {"ranked": ranked, "costs": plan.costs_as_json(costs), "objective": "latency",
                       "validation": plan.validate(costs, measure, runnable)}
        (args.out / "plan.json").write_text(json.dumps(plan_result, indent=1))

    lines = ["| context | batch | config | decode ms/token | prepare | relevancy | retrieval | apply | rest | "
             "memory % | J/token (NVML) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = row["decode_ms_per_token"]
        energy = row["energy_j_per_decode_token"]
        lines.append(f"| {row['context']} | {row['batch']} | {row['label'].split()[0]} | {t['total']:.2f} | "
                     f"{t['prepare']:.2f} | {t['relevancy']:.2f} | {t['retrieval']:.2f} | {t['apply']:.2f} | "
                     f"{t['rest_of_model']:.2f} | {row['memory_processing_pct_time']:.1f} | "
                     f"{'-' if energy is None else f'{energy:.3f}'} |")
    if plan_result is not None:
        lines.append("")
        lines.append(plan.render_plan(plan_result, top=8))
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
