"""Per-op device time, bytes moved, GB/s and % of the measured copy peak (CUDA).

    PYTHONPATH=$PWD python benchmarks/bench_ops.py [--quick]

Writes benchmarks/results/bench_ops.{json,md} (or $MEMOPS_BENCH_OUT). Shapes: the attention of
Llama-3-8B, a Qwen-style 7:1 GQA and Llama-2-7B (MHA) at S = 8K/32K/128K, batch 1 and 8, page 16,
a 2048-token budget; plus DeepSeek sparse attention's indexer (64 index heads, D 128, k 2048
tokens). When ``import flashinfer`` works, FlashInfer in the same run over a zero-copy mapping
of our cache (benchmarks/flashinfer_paged.py): its paged decode over the same pages as
sparse_apply (outputs compared), its dense paged decode, and flashinfer.top_k next to
torch.topk; skipped, with a line saying so, without FlashInfer (or with ``--no-flashinfer``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, Report, Row, cuda_switch, graph_replay, kernel_times_us,  # noqa: E402
                    median_ms, short_kernel_names)
import flashinfer_paged as fi  # noqa: E402

import torch_memops  # noqa: E402,F401
from torch_memops import ops  # noqa: E402

PAGE = 16
DTYPE = torch.bfloat16
ELEM = 2


def random_pages(B, H, N, k, device="cuda"):
    """Ascending, unique page indices [B, H, k] (k <= N), int32."""
    return torch.rand(B, H, N, device=device).topk(k, dim=-1).indices.sort(-1).values.int()


def deadline_passed() -> bool:
    deadline = float(os.environ.get("MEMOPS_BENCH_DEADLINE", "inf"))
    return time.time() > deadline


def skipped(error: Exception) -> dict:
    return {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"}


def flashinfer_attention_rows(report: Report, shape, query, keys, values, idx, scores, kp, budget) -> None:
    """FlashInfer next to sparse_apply (same pages, outputs compared), dense, and top-k."""
    import flashinfer

    B, Hq, D = query.shape
    Hkv, N = keys.shape[1], keys.shape[2] // PAGE
    tensor_cores = Hq // Hkv >= 4
    apply_bytes = 2 * B * Hkv * budget * D * ELEM + 2 * B * Hq * D * ELEM
    name = f"FlashInfer decode budget={budget} (same pages), CUDA graph"
    try:
        decode, check = fi.decode_same_pages(query, keys, values, idx, PAGE, tensor_cores)
        ours_ms = median_ms(graph_replay(lambda: ops.sparse_apply(query, keys, values, idx, PAGE)))
        report.add(Row(f"sparse_apply budget={budget}, CUDA graph", shape, ours_ms, apply_bytes))
        report.add(Row(name, shape, median_ms(graph_replay(decode.run)), apply_bytes,
                       {"tensor_cores": tensor_cores, **check}))
    except Exception as error:  # a FlashInfer failure is a row of its own, not the end of the run
        report.add(Row(name, shape, float("nan"), None, skipped(error)))
    name = "FlashInfer dense decode, CUDA graph"
    try:
        table = fi.full_page_table(B, Hkv, N, PAGE, query.device)
        decode = fi.FlashInferDecode(query, keys, values, PAGE, *table, use_tensor_cores=tensor_cores)
        report.add(Row(name, shape, median_ms(graph_replay(decode.run)),
                       2 * B * Hkv * N * PAGE * D * ELEM + 2 * B * Hq * D * ELEM, {"tensor_cores": tensor_cores}))
    except Exception as error:
        report.add(Row(name, shape, float("nan"), None, skipped(error)))
    name = f"flashinfer.top_k on scores k={kp}"
    try:
        rows = scores.view(B * Hkv, N)
        report.add(Row(name, shape, median_ms(lambda: flashinfer.top_k(rows, kp)), B * Hkv * N * 4))
    except Exception as error:
        report.add(Row(name, shape, float("nan"), None, skipped(error)))


def bench_attention_shapes(report: Report, batches, lengths, budget: int, flashinfer: bool = False) -> None:
    for model, (Hq, Hkv, D) in MODELS.items():
        for B in batches:
            for S in lengths:
                if deadline_passed():
                    return
                shape = f"{model} B{B} S{S // 1024}K"
                N, kp = S // PAGE, budget // PAGE
                keys = torch.randn(B, Hkv, S, D, device="cuda", dtype=DTYPE)
                values = torch.randn_like(keys)
                query = torch.randn(B, Hq, D, device="cuda", dtype=DTYPE)
                summary = ops.prepare_memory(keys, PAGE)

                report.add(Row("prepare_memory", shape,
                               median_ms(lambda: ops.prepare_memory(keys, PAGE)),
                               B * Hkv * (S + 2 * N) * D * ELEM))
                report.add(Row("prepare_memory_ (last page)", shape,
                               median_ms(lambda: ops.prepare_memory_(summary, keys, PAGE, N - 1)),
                               B * Hkv * 3 * PAGE * D * ELEM))

                def relevancy():
                    return ops.topk_relevancy(query, summary, kp, sink_pages=1, recent_pages=2)

                topk_bytes = B * Hkv * 2 * N * D * ELEM + B * Hq * D * ELEM + B * Hkv * kp * 8
                report.add(Row(f"topk_relevancy bound k={kp}", shape, median_ms(relevancy),
                               topk_bytes, short_kernel_names(kernel_times_us(relevancy))))
                # The same op with the selection in a kernel of its own (scoring time alone), and
                # with the portable CUDA-core kernels (the previous version), in the same run.
                with cuda_switch("MEMOPS_CUDA_FUSED_SELECT", "0"):
                    report.add(Row(f"topk_relevancy bound k={kp} [selection unfused]", shape,
                                   median_ms(relevancy), topk_bytes,
                                   short_kernel_names(kernel_times_us(relevancy))))
                with cuda_switch("MEMOPS_CUDA_TENSOR_CORES", "0"):
                    report.add(Row(f"topk_relevancy bound k={kp} [portable kernels]", shape,
                                   median_ms(relevancy), topk_bytes,
                                   short_kernel_names(kernel_times_us(relevancy))))
                scores = torch.randn(B, Hkv, N, device="cuda")
                report.add(Row(f"torch.topk on scores k={kp}", shape,
                               median_ms(lambda: torch.topk(scores, kp, dim=-1)), B * Hkv * N * 4))

                idx = random_pages(B, Hkv, N, kp)
                apply_bytes = 2 * B * Hkv * budget * D * ELEM + 2 * B * Hq * D * ELEM
                def apply():
                    return ops.sparse_apply(query, keys, values, idx, PAGE)

                report.add(Row(f"sparse_apply budget={budget}", shape, median_ms(apply),
                               apply_bytes, short_kernel_names(kernel_times_us(apply))))
                with cuda_switch("MEMOPS_CUDA_TENSOR_CORES", "0"):
                    report.add(Row(f"sparse_apply budget={budget} [portable kernels]", shape,
                                   median_ms(apply), apply_bytes,
                                   short_kernel_names(kernel_times_us(apply))))
                # The opt-in merge in the split kernel's last block next to the default merge
                # kernel, eager and as a CUDA graph (where the launch it saves would show); the
                # default's graph row comes with FlashInfer's if on.
                with cuda_switch("MEMOPS_CUDA_FUSED_MERGE", "1"):
                    report.add(Row(f"sparse_apply budget={budget} [fused merge]", shape,
                                   median_ms(apply), apply_bytes,
                                   short_kernel_names(kernel_times_us(apply))))
                    report.add(Row(f"sparse_apply budget={budget} [fused merge], CUDA graph",
                                   shape, median_ms(graph_replay(apply)), apply_bytes))
                if flashinfer:
                    flashinfer_attention_rows(report, shape, query, keys, values, idx, scores, kp, budget)
                else:
                    report.add(Row(f"sparse_apply budget={budget}, CUDA graph", shape,
                                   median_ms(graph_replay(apply)), apply_bytes))
                report.add(Row("sparse_apply dense (indices=None)", shape,
                               median_ms(lambda: ops.sparse_apply(query, keys, values, None, PAGE)),
                               2 * B * Hkv * S * D * ELEM + 2 * B * Hq * D * ELEM))
                report.add(Row(f"gather_retrieve budget={budget}", shape,
                               median_ms(lambda: ops.gather_retrieve(keys, idx, PAGE)),
                               2 * B * Hkv * budget * D * ELEM))
                out_a = torch.randn(B, Hq, D, device="cuda", dtype=DTYPE)
                lse_a = torch.randn(B, Hq, device="cuda")
                report.add(Row("merge_attention", shape,
                               median_ms(lambda: ops.merge_attention(out_a, lse_a, out_a, lse_a)),
                               3 * B * Hq * D * ELEM + 3 * B * Hq * 4))
                del keys, values, summary
                torch.cuda.empty_cache()


def bench_indexer(report: Report, batches, lengths, k: int = 2048, heads: int = 64,
                  D: int = 128) -> None:
    for B in batches:
        for S in lengths:
            if deadline_passed():
                return
            shape = f"dsa-indexer B{B} S{S // 1024}K"
            query = torch.randn(B, heads, D, device="cuda", dtype=DTYPE)
            index_keys = torch.randn(B, 1, S, 1, D, device="cuda", dtype=DTYPE)
            weights = torch.rand(B, heads, device="cuda")

            def ours():
                return ops.topk_relevancy(query, index_keys, k, mode="indexer", weights=weights)

            def torch_indexer():
                logits = torch.einsum("bhd,bnd->bhn", query, index_keys[:, 0, :, 0])
                s = torch.einsum("bh,bhn->bn", weights, logits.float().relu())
                return torch.topk(s, k, dim=-1)

            nbytes = B * S * D * ELEM + B * heads * D * ELEM + B * k * 8
            report.add(Row(f"topk_relevancy indexer k={k}", shape, median_ms(ours), nbytes,
                           short_kernel_names(kernel_times_us(ours))))
            report.add(Row(f"torch einsum+relu+topk k={k}", shape, median_ms(torch_indexer),
                           nbytes))


def bench_selection(report: Report, batches=(1, 8), pages=(8192, 16384, 32768), ks=(128, 256),
                    Hq: int = 32, Hkv: int = 8, D: int = 128) -> None:
    """The selection kernel alone (topk_relevancy with its selection unfused: the op's kernel
    split) against torch.topk on float32 scores of the same shape, at rows of N >= 8K pages."""
    for B in batches:
        for N in pages:
            if deadline_passed():
                return
            pair = torch.randn(B, Hkv, N, 2, D, device="cuda", dtype=DTYPE)
            summary = torch.stack((pair.amin(3), pair.amax(3)), dim=3)  # min <= max per page
            del pair
            query = torch.randn(B, Hq, D, device="cuda", dtype=DTYPE)
            scores = torch.randn(B, Hkv, N, device="cuda")
            for k in ks:
                shape = f"llama3-8b B{B} N{N // 1024}K pages"

                def relevancy():
                    return ops.topk_relevancy(query, summary, k)

                with cuda_switch("MEMOPS_CUDA_FUSED_SELECT", "0"):
                    kernels = short_kernel_names(kernel_times_us(relevancy))
                    total = median_ms(relevancy)
                select_us = sum(us for name, us in kernels.items() if "select" in name)
                topk_ms = median_ms(lambda: torch.topk(scores, k, dim=-1))
                report.add(Row(f"selection k={k} (topk_relevancy, selection unfused)", shape, total, None,
                               {**kernels, "selection_kernel_us": select_us, "torch_topk_us": round(topk_ms * 1e3, 1),
                                "torch_topk_over_selection": round(topk_ms * 1e3 / select_us, 2) if select_us else None}))
            del summary
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, S = 32K only")
    parser.add_argument("--selection", action="store_true",
                        help="only the selection at rows of 8K-32K pages against torch.topk")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip the FlashInfer rows")
    args = parser.parse_args()
    batches = [8] if args.quick else [1, 8]
    lengths = [32768] if args.quick else [8192, 32768, 131072]
    report = Report("bench_ops")
    flashinfer = None if args.no_flashinfer else fi.flashinfer_version()
    report.info["flashinfer"] = flashinfer
    print(f"{report.info}", flush=True)
    print(f"FlashInfer {flashinfer}: measured in the same run" if flashinfer else
          "FlashInfer: not measured (" + ("--no-flashinfer" if args.no_flashinfer else "import flashinfer failed")
          + ")", flush=True)
    if args.selection:
        bench_selection(report)
        return
    bench_attention_shapes(report, batches, lengths, budget=2048, flashinfer=flashinfer is not None)
    bench_indexer(report, batches, lengths)
    bench_selection(report)


if __name__ == "__main__":
    main()
