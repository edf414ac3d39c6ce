"""One sparse-attention decode step (relevancy + top-k + apply) against the alternatives.

    PYTHONPATH=$PWD python benchmarks/bench_decode.py [--quick]

For each shape, in the same run: our step as two ops (topk_relevancy + sparse_apply, eager and
in a CUDA graph) and as one (topk_sparse_apply, one kernel launch, CUDA graph), dense decode through every F.scaled_dot_product_attention
backend that runs, our sparse_apply(indices=None), the pure-PyTorch Quest pipeline (vectorised
torch code with reference.py's semantics; reference.py's own loops are far too slow at these
sizes) eager and under torch.compile, and, when ``import flashinfer`` works, FlashInfer in the
same run over a zero-copy mapping of our cache (benchmarks/flashinfer_paged.py): FlashInfer's
paged decode over the pages our topk_relevancy selected (checked against our sparse_apply on
those pages), its dense paged decode, and the Quest step assembled from peers (torch.compile'd
bound scoring + flashinfer.top_k + FlashInfer decode), all in CUDA graphs. Without FlashInfer
those rows are skipped and the script says so. Speed-ups are quoted against the fastest dense
decode measured, next to the ideal ratio S / (S/P + budget).
Writes benchmarks/results/bench_decode.{json,md} (or $MEMOPS_BENCH_OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, Report, Row, graph_replay, kernel_times_us, median_ms,  # noqa: E402
                    short_kernel_names)
import flashinfer_paged as fi  # noqa: E402

import torch_memops  # noqa: E402,F401
from torch_memops import ops  # noqa: E402

PAGE = 16
DTYPE = torch.bfloat16
SINK_PAGES, RECENT_PAGES = 1, 2
# Issue 11's table: (S, model, batch, budgets).
ISSUE_CELLS = [
    (32768, "llama3-8b", 8, [2048]), (32768, "llama3-8b", 1, [2048]),
    (131072, "llama3-8b", 8, [4096]), (131072, "llama3-8b", 1, [4096]),
    (32768, "qwen-7to1", 8, [2048]),
    (32768, "llama2-7b", 1, [2048]), (32768, "llama2-7b", 8, [2048]), (131072, "llama2-7b", 8, [4096]),
]
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def quest_torch(query, summary, k_cache, v_cache, budget_pages: int):
    """Quest decode in vectorised PyTorch: bound scores (GQA max), torch.topk, gather, SDPA."""
    B, Hq, D = query.shape
    Hkv = summary.shape[1]
    qg = query.float().view(B, Hkv, Hq // Hkv, 1, D)
    lo, hi = summary[:, :, None, :, 0].float(), summary[:, :, None, :, 1].float()
    scores = torch.maximum(qg * lo, qg * hi).sum(-1).amax(2)  # [B, Hkv, N]
    pages = scores.topk(budget_pages, dim=-1).indices.sort(-1).values
    tokens = (pages[..., None] * PAGE + torch.arange(PAGE, device=query.device)).flatten(-2)
    gather = tokens[..., None].expand(-1, -1, -1, D)
    keys, values = k_cache.gather(2, gather), v_cache.gather(2, gather)
    return F.scaled_dot_product_attention(query[:, :, None], keys, values, enable_gqa=True)


def memops_step(query, summary, k_cache, v_cache, budget_pages: int):
    _, idx = ops.topk_relevancy(query, summary, budget_pages, sink_pages=SINK_PAGES, recent_pages=RECENT_PAGES)
    return ops.sparse_apply(query, k_cache, v_cache, idx, PAGE)


def memops_one_launch(query, summary, k_cache, v_cache, budget_pages: int):
    """The same step as one kernel launch (topk_sparse_apply with MEMOPS_CUDA_FUSED_STEP=1, which the
    binding reads at every call: the graph captures the kernel the capture-time call launched)."""
    previous = os.environ.get("MEMOPS_CUDA_FUSED_STEP")
    os.environ["MEMOPS_CUDA_FUSED_STEP"] = "1"
    try:
        return ops.topk_sparse_apply(query, summary, k_cache, v_cache, budget_pages, PAGE, sink_pages=SINK_PAGES,
                                     recent_pages=RECENT_PAGES)
    finally:
        if previous is None:
            del os.environ["MEMOPS_CUDA_FUSED_STEP"]
        else:
            os.environ["MEMOPS_CUDA_FUSED_STEP"] = previous


def dense_rows(report, shape, query, k_cache, v_cache) -> dict[str, float]:
    B, Hq, D = query.shape
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    q4 = query[:, :, None]
    times = {}
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k_cache, v_cache, enable_gqa=True)
        try:
            run()
            torch.cuda.synchronize()
        except RuntimeError as e:
            report.add(Row(f"dense sdpa[{name}]", shape, float("nan"), None,
                           {"skipped": str(e).splitlines()[0][:80]}))
            continue
        times[f"sdpa[{name}]"] = report.add(
            Row(f"dense sdpa[{name}]", shape, median_ms(run), nbytes)).ms
        if name != "math":
            # Graph-captured too, so that a graph-captured memops step is compared with the
            # same launch conditions.
            times[f"sdpa[{name}] graph"] = report.add(
                Row(f"dense sdpa[{name}], CUDA graph", shape, median_ms(graph_replay(run)),
                    nbytes)).ms
    times["memops dense"] = report.add(Row(
        "dense memops.sparse_apply(None)", shape,
        median_ms(lambda: ops.sparse_apply(query, k_cache, v_cache, None, PAGE)), nbytes)).ms
    return times


def use_tensor_cores(choice: str, group: int) -> bool:
    """FlashInfer's tensor-core decode for GQA groups of 4 and more (``auto``), or as told."""
    return group >= 4 if choice == "auto" else choice == "on"


def flashinfer_dense_row(report, shape, query, k_cache, v_cache, tensor_cores: bool):
    """FlashInfer's paged decode over every page of our cache, CUDA graph."""
    B, Hq, D = query.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2] // PAGE
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    try:
        table = fi.full_page_table(B, Hkv, N, PAGE, query.device)
        decode = fi.FlashInferDecode(query, k_cache, v_cache, PAGE, *table, use_tensor_cores=tensor_cores)
        ms = median_ms(graph_replay(decode.run))
    except Exception as error:  # a FlashInfer failure is a result of its own, not the end of the run
        report.add(Row("FlashInfer dense decode, CUDA graph", shape, float("nan"), None,
                       {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"}))
        return None
    return report.add(Row("FlashInfer dense decode, CUDA graph", shape, ms, nbytes,
                          {"tensor_cores": tensor_cores})).ms


def flashinfer_rows(report, cell, query, summary, k_cache, v_cache, kp, nbytes, fastest, tensor_cores: bool):
    """FlashInfer over our selected pages (checked against sparse_apply), and the peer pipeline."""
    B, _, D = query.shape
    Hkv = k_cache.shape[1]
    _, idx = ops.topk_relevancy(query, summary, kp, sink_pages=SINK_PAGES, recent_pages=RECENT_PAGES)
    apply_bytes = 2 * B * Hkv * kp * PAGE * D * k_cache.element_size()
    name = "FlashInfer decode, our selected pages, CUDA graph"
    try:
        decode, check = fi.decode_same_pages(query, k_cache, v_cache, idx, PAGE, tensor_cores)
        ms = median_ms(graph_replay(decode.run))
        ours_ms = median_ms(graph_replay(lambda: ops.sparse_apply(query, k_cache, v_cache, idx, PAGE)))
        report.add(Row(name, cell, ms, apply_bytes, {"tensor_cores": tensor_cores, **check,
                                                     "our_sparse_apply_graph_us": round(ours_ms * 1e3, 1),
                                                     "ours_vs_flashinfer": round(ms / ours_ms, 2)}))
    except Exception as error:
        report.add(Row(name, cell, float("nan"), None,
                       {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"}))
    name = "FlashInfer pipeline (compiled scoring + flashinfer.top_k + decode), CUDA graph"
    try:
        step = fi.flashinfer_pipeline(query, summary, k_cache, v_cache, PAGE, kp, sink_pages=SINK_PAGES,
                                      recent_pages=RECENT_PAGES, use_tensor_cores=tensor_cores)
        ms = median_ms(graph_replay(step))
        report.add(Row(name, cell, ms, nbytes, {"speedup": round(fastest / ms, 2), "tensor_cores": tensor_cores}))
    except Exception as error:
        report.add(Row(name, cell, float("nan"), None,
                       {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths S")
    parser.add_argument("--budgets", type=int, nargs="+", help="token budgets")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="attention shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--issue-cells", action="store_true",
                        help="the eight cells of issue 11's table (budget 2048 at 32K, 4096 at 128K), of --models if given")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip the FlashInfer rows")
    parser.add_argument("--flashinfer-tensor-cores", choices=("auto", "on", "off"), default="auto",
                        help="FlashInfer's use_tensor_cores (auto: for GQA groups >= 4)")
    args = parser.parse_args()
    deadline = float(os.environ.get("MEMOPS_BENCH_DEADLINE", "inf"))
    batches = args.batches or [8, 1]
    lengths = args.lengths or ([32768] if args.quick else [32768, 131072, 8192])
    budgets = args.budgets or ([2048] if args.quick else [2048, 4096, 1024])
    models = {name: MODELS[name] for name in (args.models or MODELS)}
    # torch.compile takes tens of seconds per shape: compile at the target cells only.
    compile_cells = set() if args.no_compile else {
        ("llama3-8b", 8, 32768), ("llama3-8b", 8, 131072), ("llama2-7b", 1, 32768),
        ("llama2-7b", 1, 131072), ("qwen-7to1", 8, 32768)}
    report = Report("bench_decode" + args.tag)
    print(f"{report.info}", flush=True)
    flashinfer = None if args.no_flashinfer else fi.flashinfer_version()
    report.info["flashinfer"] = flashinfer
    if flashinfer is None:
        print("FlashInfer: not measured (" + ("--no-flashinfer" if args.no_flashinfer else
                                              "import flashinfer failed") + ")", flush=True)
    else:
        print(f"FlashInfer {flashinfer}: measured in the same run", flush=True)
    compiled_quest = torch.compile(quest_torch, dynamic=False)
    if args.issue_cells:  # --models narrows them
        cells = [cell for cell in ISSUE_CELLS if args.models is None or cell[1] in args.models]
    else:
        cells = [(S, model, B, budgets) for S in lengths for model in models for B in batches]
    for S, model, B, cell_budgets in cells:
        Hq, Hkv, D = MODELS[model]
        if time.time() > deadline:
            print("deadline reached: remaining cells not measured", flush=True)
            return
        shape = f"{model} B{B} S{S // 1024}K"
        k_cache = torch.randn(B, Hkv, S, D, device="cuda", dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        query = torch.randn(B, Hq, D, device="cuda", dtype=DTYPE)
        summary = ops.prepare_memory(k_cache, PAGE)
        dense = dense_rows(report, shape, query, k_cache, v_cache)
        tensor_cores = use_tensor_cores(args.flashinfer_tensor_cores, Hq // Hkv)
        if flashinfer is not None:
            fi_dense = flashinfer_dense_row(report, shape, query, k_cache, v_cache, tensor_cores)
            if fi_dense is not None:
                dense["flashinfer dense"] = fi_dense
        fastest_name = min(dense, key=dense.get)
        fastest = dense[fastest_name]
        for budget in cell_budgets:
            kp = budget // PAGE
            ideal = S / (S / PAGE + budget)
            cell = f"{shape} budget{budget}"
            nbytes = (summary.numel() * summary.element_size()
                      + 2 * B * Hkv * budget * D * k_cache.element_size())
            def step():
                return memops_step(query, summary, k_cache, v_cache, kp)

            ms = median_ms(step)
            report.add(Row("memops step (topk_relevancy+sparse_apply)", cell, ms, nbytes,
                           {"speedup": round(fastest / ms, 2), "ideal": round(ideal, 2),
                            "pct_of_ideal": round(100 * fastest / ms / ideal, 1),
                            "vs": fastest_name,
                            **short_kernel_names(kernel_times_us(step))}))
            # The same step captured in a CUDA graph, as serving engines run decode: no
            # host work between the kernels.
            replay = graph_replay(lambda: memops_step(query, summary, k_cache, v_cache, kp))
            ms = median_ms(replay)
            report.add(Row("memops step, CUDA graph", cell, ms, nbytes,
                           {"speedup": round(fastest / ms, 2), "ideal": round(ideal, 2),
                            "pct_of_ideal": round(100 * fastest / ms / ideal, 1),
                            "vs": fastest_name}))
            def one_launch():
                return memops_one_launch(query, summary, k_cache, v_cache, kp)

            two_op_out = memops_step(query, summary, k_cache, v_cache, kp)[0]
            agree = (one_launch().out.float() - two_op_out.float()).abs().max().item()
            ms = median_ms(graph_replay(one_launch))
            report.add(Row("memops one-launch step (topk_sparse_apply), CUDA graph", cell, ms, nbytes,
                           {"speedup": round(fastest / ms, 2), "ideal": round(ideal, 2),
                            "pct_of_ideal": round(100 * fastest / ms / ideal, 1), "vs": fastest_name,
                            "max_abs_diff_vs_two_ops": agree, **short_kernel_names(kernel_times_us(one_launch))}))
            ms = median_ms(lambda: quest_torch(query, summary, k_cache, v_cache, kp))
            report.add(Row("torch Quest eager", cell, ms, nbytes,
                           {"speedup": round(fastest / ms, 2)}))
            if (model, B, S) in compile_cells and budget == 2048:
                compiled_quest(query, summary, k_cache, v_cache, kp)
                ms = median_ms(lambda: compiled_quest(query, summary, k_cache, v_cache, kp))
                report.add(Row("torch Quest torch.compile", cell, ms, nbytes,
                               {"speedup": round(fastest / ms, 2)}))
            if flashinfer is not None:
                flashinfer_rows(report, cell, query, summary, k_cache, v_cache, kp, nbytes, fastest,
                                tensor_cores)
        del k_cache, v_cache, summary
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
