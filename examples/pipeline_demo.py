"""Runs the four memory-processing steps on random data and shows what each one did.

Llama-like decode shapes by default (B=1, Hq=32, Hkv=8, D=128, a 32K-token cache, 16-token
pages, a budget of 2048 tokens). A few pages are planted with keys that point along the query,
so the selection has something real to find. For each step the script prints what it selected
and its median time; at the end it compares the sparse result with dense attention.

    python examples/pipeline_demo.py [--seq-len 32768] [--budget 2048] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import torch_memops as memops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32 * 1024, help="cached tokens S")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=2048, help="tokens attended per head")
    parser.add_argument("--planted", type=int, default=8, help="relevant pages planted per row")
    parser.add_argument("--plant-strength", type=float, default=3.0,
                        help="how far planted keys lean towards the query (0: pure noise)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    S, P, dtype = args.seq_len, args.page_size, DTYPES[args.dtype]
    N = -(-S // P)
    k = max(1, min(args.budget // P, N))
    sink, recent = min(1, k), min(4, k - min(1, k))

    query = torch.randn(B, Hq, D)
    keys = torch.randn(B, Hkv, S, D)
    values = torch.randn(B, Hkv, S, D)
    # Plant relevant pages: their keys lean towards the mean query of their GQA group.
    planted = torch.randperm(N - sink - recent)[: args.planted] + sink
    group_query = query.view(B, Hkv, Hq // Hkv, D).mean(2, keepdim=True)
    for page in planted.tolist():
        keys[:, :, page * P : (page + 1) * P] += args.plant_strength * group_query
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)

    print(f"torch_memops {memops.__version__}, torch {torch.__version__}, CPU with "
          f"{torch.get_num_threads()} threads, {args.dtype}")
    print(f"B={B} Hq={Hq} Hkv={Hkv} D={D} S={S} P={P}: N={N} pages; budget {args.budget} "
          f"tokens = k={k} pages ({sink} sink, {recent} recent)\n")

    rows = []
    summary = memops.prepare_memory(keys, P)
    rows.append(("1 prepare_memory", median_ms(lambda: memops.prepare_memory(keys, P),
                                               args.repeats),
                 f"summary {list(summary.shape)}: min and max of every page"))
    last = N - 1
    rows.append(("1 prepare_memory_", median_ms(
        lambda: memops.prepare_memory_(summary, keys, P, last), args.repeats),
        f"decode update: recomputed page {last} only"))

    scores, indices = memops.topk_relevancy(query, summary, k, sink_pages=sink,
                                            recent_pages=recent)
    rows.append(("2 topk_relevancy", median_ms(
        lambda: memops.topk_relevancy(query, summary, k, sink_pages=sink, recent_pages=recent),
        args.repeats), f"{k} of {N} pages per kv head"))

    gathered_k, lengths = memops.gather_retrieve(keys, indices, P)
    rows.append(("3 gather_retrieve", median_ms(
        lambda: (memops.gather_retrieve(keys, indices, P),
                 memops.gather_retrieve(values, indices, P)), args.repeats),
        f"K and V: {int(lengths[0, 0])} tokens per head into {list(gathered_k.shape)}"))

    out, lse = memops.sparse_apply(query, keys, values, indices, P)
    rows.append(("4 sparse_apply", median_ms(
        lambda: memops.sparse_apply(query, keys, values, indices, P), args.repeats),
        f"attention over the {k * P} selected tokens of each head"))
    dense_out, dense_lse = memops.sparse_apply(query, keys, values, None, P)
    rows.append(("  dense baseline", median_ms(
        lambda: memops.sparse_apply(query, keys, values, None, P), args.repeats),
        f"attention over all {S} tokens (sparse_apply, indices=None)"))

    print(f"{'step':<20} {'median ms':>10}  what it did")
    for name, ms, what in rows:
        print(f"{name:<20} {ms:>10.3f}  {what}")

    print("\nselected pages (first 6 and last 2 of each row shown):")
    for h in range(min(Hkv, 4)):
        row = indices[0, h].tolist()
        print(f"  kv head {h}: {row[:6]} ... {row[-2:]}  top score {scores[0, h].max():.1f}")
    found = [len(set(planted.tolist()) & set(indices[b, h].tolist()))
             for b in range(B) for h in range(Hkv)]
    count = f"{min(found)}" if min(found) == max(found) else f"{min(found)} to {max(found)}"
    print(f"planted pages {sorted(planted.tolist())}: every (batch, kv head) row selected "
          f"{count} of these {len(planted)}")

    mass = (lse.float() - dense_lse).exp()
    cosine = torch.nn.functional.cosine_similarity(out.float(), dense_out.float(), dim=-1)
    error = (out.float() - dense_out.float()).abs().max()
    print(f"\nsparse vs dense attention: softmax mass kept {mass.mean():.3f} (min "
          f"{mass.min():.3f}), cosine similarity {cosine.mean():.4f} (min {cosine.min():.4f}), "
          f"max abs difference {error:.4f}")


if __name__ == "__main__":
    main()
