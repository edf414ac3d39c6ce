"""topk_relevancy on a bf16 vs an int8 summary, and one-page Prepare, at Llama-3-8B 32K (CUDA graph).

Rows at batch 8 (the original four, same names) and batch 1 (names end in ", B1"); each row also
has `batch` and `path`: "default" (tensor cores where they apply, selection fused into the
scoring kernel for rows of up to 8192 pages), "separate selection" (MEMOPS_CUDA_FUSED_SELECT=0:
scoring kernel + selection kernel) and "portable" (MEMOPS_CUDA_TENSOR_CORES=0). The op exposes no
scoring-only call, so `kernels` splits the separate-selection path into its kernels with
torch.profiler (eager launches, device time per launch): the scoring kernel alone vs the
selection kernel. Usage: python3 benchmarks/bench_int8.py OUT_DIR (writes OUT_DIR/int8_timing.json).
"""
import json
import os
import sys

import torch

from torch_memops import ops

out = sys.argv[1]
torch.manual_seed(0)
Hq, Hkv, D, P, S, budget = 32, 8, 128, 16, 32768, 2048
N, k = S // P, budget // P
dev = "cuda"
peak = 4.8e12  # H200 HBM3e nominal bytes/s (the copy peak measured in docs/performance.md is lower)


class switch:
    """Sets one MEMOPS_CUDA_* switch (read at every call) for a block."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.saved = os.environ.get(self.name)
        if self.name:
            os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if not self.name:
            return
        if self.saved is None:
            del os.environ[self.name]
        else:
            os.environ[self.name] = self.saved


PATHS = {"default": ("", ""), "separate selection": ("MEMOPS_CUDA_FUSED_SELECT", "0"),
         "portable": ("MEMOPS_CUDA_TENSOR_CORES", "0")}


def median_us(fn, iters=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


def kernel_split(fn, iters=20):
    """Device microseconds per launch of every kernel that fn runs (eager, profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    split = []
    for e in prof.key_averages():
        if not str(e.device_type).endswith("CUDA"):
            continue
        total = getattr(e, "self_device_time_total", None)
        if total is None:
            total = getattr(e, "self_cuda_time_total", 0)
        if total > 0 and e.count > 0:
            split.append(dict(kernel=e.key[:120], us=total / e.count, launches=e.count / iters))
    return sorted(split, key=lambda r: -r["us"])


rows, kernels, overlaps = [], [], {}
for B in (8, 1):
    tag = "" if B == 8 else f", B{B}"
    keys = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
    query = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
    summary = ops.prepare_memory(keys, P)
    q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
    topk = {
        "bf16": (lambda: ops.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=4),
                 summary.numel() * 2),
        "int8": (lambda: ops.topk_relevancy(query, q8, k, sink_pages=1, recent_pages=4),
                 q8.codes.numel() + q8.scales.numel() * 4),
    }
    for kind, (fn, nbytes) in topk.items():
        for path, (name, value) in PATHS.items():
            with switch(name, value):
                us = median_us(fn)
            rows.append(dict(op=f"topk_relevancy {kind} summary{tag}" +
                             ("" if path == "default" else f" ({path})"),
                             us=us, bytes=nbytes, gbps=nbytes / us / 1e3, batch=B, path=path,
                             floor_us=nbytes / peak * 1e6))
        with switch(*PATHS["separate selection"]):
            try:
                for r in kernel_split(fn):
                    kernels.append(dict(op=f"topk_relevancy {kind} summary{tag}", batch=B,
                                        path="separate selection", **r))
            except Exception as exc:  # no CUPTI: the rows above still stand
                kernels.append(dict(op=f"topk_relevancy {kind} summary{tag}", batch=B,
                                    error=repr(exc)[:200]))
    if B == 8:
        prepare = [
            ("prepare_memory_ bf16 (1 page)", lambda: ops.prepare_memory_(summary, keys, P, N - 1),
             B * Hkv * P * D * 2 + B * Hkv * 2 * D * 2),
            ("prepare_memory_ int8 (1 page)",
             lambda: ops.prepare_memory_(q8, keys, P, N - 1, mode="minmax_int8"),
             B * Hkv * P * D * 2 + B * Hkv * (2 * D + 4)),
        ]
        for name, fn, nbytes in prepare:
            us = median_us(fn)
            rows.append(dict(op=name, us=us, bytes=nbytes, gbps=nbytes / us / 1e3, batch=B,
                             path="default"))
    # Same selection? (int8 bounds are looser, so a few pages may differ; report the overlap.)
    i16 = topk["bf16"][0]()[1]
    i8 = topk["int8"][0]()[1]
    overlap = sum(len(set(a.tolist()) & set(b.tolist()))
                  for a, b in zip(i16.view(-1, k), i8.view(-1, k)))
    overlaps[B] = overlap / i16.numel()
    del keys, summary, q8
    torch.cuda.empty_cache()

info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
            shape=dict(B=8, Hq=Hq, Hkv=Hkv, D=D, P=P, S=S, k=k), batches=[8, 1], rows=rows,
            kernels=kernels, selection_overlap=overlaps[8], selection_overlap_b1=overlaps[1])
json.dump(info, open(f"{out}/int8_timing.json", "w"), indent=1)
print(f"{'kernel (separate-selection path, eager)':64s} {'us':>8s}")
for r in kernels:
    if "us" in r:
        print(f"{(r['op'] + ': ' + r['kernel'])[:64]:64s} {r['us']:8.2f}")
print(f"{'op':52s} {'us':>9s} {'MB':>8s} {'GB/s':>8s}")
for r in rows:
    print(f"{r['op']:52s} {r['us']:9.2f} {r['bytes'] / 1e6:8.2f} {r['gbps']:8.0f}")
for B in (8, 1):
    us = {r["op"].split()[1]: r["us"] for r in rows
          if r["batch"] == B and r["path"] == "default" and r["op"].startswith("topk")}
    print(f"B{B}: topk_relevancy int8 / bf16 summary time {us['int8'] / us['bf16']:.2f}")
print(f"selected-page overlap int8 vs bf16 (random keys): B8 {overlaps[8]:.3f}, B1 {overlaps[1]:.3f}")
