"""Per-token decode latency of a Llama-3-8B-shaped model, dense attention vs the memops pipeline.

The model has Llama-3-8B's shapes (hidden 4096, 32 query / 8 kv heads of 128, MLP 14336, vocab
128256) and random weights; nothing is downloaded. ``--layers`` keeps fewer decoder layers (all
32 by default) when memory or time is short; the JSON records how many ran. Decode latency does
not depend on what the cache holds, so each cache is filled with random keys/values of the
context's length instead of running a prefill: the dense baseline is the stock transformers
``DynamicCache`` with SDPA attention, the pipeline a ``MemopsCache`` holding the same tensors.
A step is one ``model(...)`` call with one new token per row (``logits_to_keep=1``); the median
over ``--steps`` timed steps after ``--warmup`` steps is reported, with CUDA synchronised around
each step.

    python benchmarks/bench_e2e.py --json results/e2e.json                 # GPU: 8K/32K/128K
    python benchmarks/bench_e2e.py --quick --json /tmp/e2e.json            # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from torch_memops import hf

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
QUICK = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             vocab_size=1024, rope_theta=500000.0, max_position_embeddings=8192)


def build_model(shape, layers, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def random_prefix(model, batch, context, dtype, device):
    config = model.config
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    generator = torch.Generator(device=device).manual_seed(1)
    return [(torch.randn(shape, dtype=dtype, device=device, generator=generator),
             torch.randn(shape, dtype=dtype, device=device, generator=generator))
            for _ in range(config.num_hidden_layers)]


def kv_bytes(model, batch, context, dtype):
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * batch * context * torch.finfo(dtype).bits // 8


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model, cache, batch, context, args, device):
    """Median seconds of one decode step over ``args.steps`` steps after ``args.warmup`` steps."""
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    cache_kwarg = {hf.cache_argument(model): cache}
    times = []
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_kwarg)
            synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_cache(model, prefix):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    return None


def run_case(model, batch, context, args, device, dtype):
    needed = 3 * kv_bytes(model, batch, context, dtype)  # prefix, the dense cache's copy, one more for growth
    available = free_memory(device)
    if available is not None and needed > 0.9 * available:
        return {"batch": batch, "context": context,
                "skipped": f"needs about {needed / 2**30:.1f} GiB of KV, {available / 2**30:.1f} GiB free"}
    prefix = random_prefix(model, batch, context, dtype, device)
    dense_seconds = time_decode(model, dense_cache(model, prefix), batch, context, args, device)
    free_memory(device)
    config = hf.MemopsConfig(method="quest", page_size=args.page_size, token_budget=args.budget,
                             dense_layers=args.dense_layers)
    with hf.enable(model, config) as session:
        cache = session.new_cache(prefix)
        del prefix
        free_memory(device)
        memops_seconds = time_decode(model, cache, batch, context, args, device)
    del cache
    free_memory(device)
    return {"batch": batch, "context": context, "dense_ms": 1e3 * dense_seconds, "memops_ms": 1e3 * memops_seconds,
            "speedup": dense_seconds / memops_seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a small model (hidden 256, 2 layers), 1K/2K contexts and few steps: a smoke run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = LLAMA3_8B
    if args.quick:
        shape, args.layers, args.contexts, args.batches = QUICK, 2, [1024, 2048], [1, 2]
        args.steps, args.warmup, args.budget = 3, 1, 256
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import transformers

    model = build_model(shape, args.layers, dtype, device)
    result = {
        "model": ("Llama-3-8B shapes" if not args.quick else "small Llama (quick)") + f", {args.layers} layers, "
                 "random weights",
        "shape": shape, "layers": args.layers, "dtype": args.dtype,
        "pipeline": {"method": "quest", "token_budget": args.budget, "page_size": args.page_size,
                     "dense_layers": args.dense_layers},
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                        or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__},
        "steps": args.steps, "warmup": args.warmup, "cases": [],
    }
    for context in args.contexts:
        for batch in args.batches:
            case = run_case(model, batch, context, args, device, dtype)
            result["cases"].append(case)
            if "skipped" in case:
                print(f"context {context:>7} batch {batch}: skipped ({case['skipped']})", file=sys.stderr)
            else:
                print(f"context {context:>7} batch {batch}: dense {case['dense_ms']:.2f} ms, memops "
                      f"{case['memops_ms']:.2f} ms, speed-up {case['speedup']:.2f}x", file=sys.stderr)
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["cases"], indent=2))


if __name__ == "__main__":
    main()
