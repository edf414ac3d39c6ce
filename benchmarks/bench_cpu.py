"""The memops ops on the CPU: median wall time, bytes moved, GB/s and % of the measured copy peak,
each next to the vectorised PyTorch way of doing the same step, in the same run.

    PYTHONPATH=$PWD python benchmarks/bench_cpu.py [--quick] [--tag NAME]

Writes benchmarks/results/bench_cpu[-NAME].{json,md} (or $MEMOPS_BENCH_OUT). Shapes: the attention
of Llama-3-8B (32 query / 8 kv heads of 128) and Llama-2-7B (MHA, 32/32) at batch 1, S = 8K and
32K, page 16, a 2048-token budget, bfloat16, float16 and float32: what a user placing a step on the CPU
(``MemopsConfig(placement=...)``) runs per layer and decode step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, Report, Row, cpu_median_ms  # noqa: E402

import torch_memops  # noqa: E402,F401
from torch_memops import ops  # noqa: E402

PAGE = 16
BUDGET = 2048


def torch_summary(keys):
    B, H, S, D = keys.shape
    pages = keys.view(B, H, S // PAGE, PAGE, D)
    return torch.stack([pages.amin(3), pages.amax(3)], dim=3)


def torch_topk_bound(query, summary, k):
    """Quest's bound in vectorised PyTorch (float32, GQA max), then torch.topk."""
    B, Hq, D = query.shape
    Hkv = summary.shape[1]
    qg = query.float().view(B, Hkv, Hq // Hkv, 1, D)
    lo, hi = summary[:, :, None, :, 0].float(), summary[:, :, None, :, 1].float()
    scores = torch.maximum(qg * lo, qg * hi).sum(-1).amax(2)
    return scores.topk(k, dim=-1)


def torch_sparse_apply(query, k_cache, v_cache, pages):
    """Gather the selected pages' tokens, then SDPA over them (GQA)."""
    D = query.shape[-1]
    tokens = (pages.long()[..., None] * PAGE + torch.arange(PAGE)).flatten(-2)
    index = tokens[..., None].expand(-1, -1, -1, D)
    keys, values = k_cache.gather(2, index), v_cache.gather(2, index)
    return F.scaled_dot_product_attention(query[:, :, None], keys, values, enable_gqa=True)


def bench(report: Report, models, lengths, dtypes) -> None:
    for dtype in dtypes:
        elem = torch.empty(0, dtype=dtype).element_size()
        for model in models:
            Hq, Hkv, D = MODELS[model]
            for S in lengths:
                B, N, kp = 1, S // PAGE, BUDGET // PAGE
                shape = f"{model} B{B} S{S // 1024}K {str(dtype).replace('torch.', '')}"
                torch.manual_seed(0)
                keys = torch.randn(B, Hkv, S, D, dtype=dtype)
                values = torch.randn_like(keys)
                query = torch.randn(B, Hq, D, dtype=dtype)
                summary = ops.prepare_memory(keys, PAGE)

                nbytes = B * Hkv * (S + 2 * N) * D * elem
                report.add(Row("prepare_memory", shape,
                               cpu_median_ms(lambda: ops.prepare_memory(keys, PAGE)), nbytes))
                report.add(Row("torch amin + amax", shape,
                               cpu_median_ms(lambda: torch_summary(keys)), nbytes))

                nbytes = B * Hkv * 2 * N * D * elem + B * Hkv * kp * 8
                report.add(Row(f"topk_relevancy bound k={kp}", shape,
                               cpu_median_ms(lambda: ops.topk_relevancy(
                                   query, summary, kp, sink_pages=1, recent_pages=2)), nbytes))
                report.add(Row(f"torch bound + topk k={kp}", shape,
                               cpu_median_ms(lambda: torch_topk_bound(query, summary, kp)),
                               nbytes))

                _, idx = ops.topk_relevancy(query, summary, kp, sink_pages=1, recent_pages=2)
                nbytes = 2 * B * Hkv * BUDGET * D * elem
                report.add(Row(f"sparse_apply budget={BUDGET}", shape,
                               cpu_median_ms(lambda: ops.sparse_apply(
                                   query, keys, values, idx, PAGE)), nbytes))
                report.add(Row(f"torch gather + sdpa budget={BUDGET}", shape,
                               cpu_median_ms(lambda: torch_sparse_apply(
                                   query, keys, values, idx)), nbytes))

                nbytes = 2 * B * Hkv * S * D * elem
                report.add(Row("sparse_apply dense (indices=None)", shape,
                               cpu_median_ms(lambda: ops.sparse_apply(
                                   query, keys, values, None, PAGE), reps=5), nbytes))
                report.add(Row("torch sdpa dense", shape,
                               cpu_median_ms(lambda: F.scaled_dot_product_attention(
                                   query[:, :, None], keys, values, enable_gqa=True), reps=5),
                               nbytes))

                nbytes = 2 * B * Hkv * BUDGET * D * elem
                report.add(Row(f"gather_retrieve budget={BUDGET}", shape,
                               cpu_median_ms(lambda: ops.gather_retrieve(keys, idx, PAGE)),
                               nbytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B, S = 8K, bf16 only")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args()
    models = ["llama3-8b"] if args.quick else ["llama3-8b", "llama2-7b"]
    lengths = [8192] if args.quick else [8192, 32768]
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    report = Report("bench_cpu" + (f"-{args.tag}" if args.tag else ""), device="cpu")
    print(report.info, f"copy peak {report.peak_gbps:.1f} GB/s", flush=True)
    bench(report, models, lengths, dtypes)


if __name__ == "__main__":
    main()
