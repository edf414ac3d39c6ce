"""topk_relevancy on a bf16 vs an int8 summary, and one-page Prepare, at Llama-3-8B B8 32K (CUDA graph)."""
import json, sys
import torch
from torch_memops import ops

out = sys.argv[1]
torch.manual_seed(0)
B, Hq, Hkv, D, P, S, budget = 8, 32, 8, 128, 16, 32768, 2048
N, k = S // P, budget // P
dev = "cuda"
keys = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
query = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
summary = ops.prepare_memory(keys, P)
q8 = ops.prepare_memory(keys, P, mode="minmax_int8")
peak = 4.8e12  # H200 HBM3e nominal bytes/s (the copy peak measured in docs/performance.md is lower)


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


rows = []
cases = [
    ("topk_relevancy bf16 summary", lambda: ops.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=4),
     summary.numel() * 2),
    ("topk_relevancy int8 summary", lambda: ops.topk_relevancy(query, q8, k, sink_pages=1, recent_pages=4),
     q8.codes.numel() + q8.scales.numel() * 4),
    ("prepare_memory_ bf16 (1 page)", lambda: ops.prepare_memory_(summary, keys, P, N - 1),
     B * Hkv * P * D * 2 + B * Hkv * 2 * D * 2),
    ("prepare_memory_ int8 (1 page)", lambda: ops.prepare_memory_(q8, keys, P, N - 1, mode="minmax_int8"),
     B * Hkv * P * D * 2 + B * Hkv * (2 * D + 4)),
]
for name, fn, nbytes in cases:
    us = median_us(fn)
    rows.append(dict(op=name, us=us, bytes=nbytes, gbps=nbytes / us / 1e3))
# Same selection? (int8 bounds are looser, so a few pages may differ; report the overlap.)
i16 = ops.topk_relevancy(query, summary, k, sink_pages=1, recent_pages=4)[1]
i8 = ops.topk_relevancy(query, q8, k, sink_pages=1, recent_pages=4)[1]
overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i16.view(-1, k), i8.view(-1, k)))
overlap /= i16.numel()
info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=dict(B=B, Hq=Hq, Hkv=Hkv, D=D, P=P, S=S, k=k),
            rows=rows, selection_overlap=overlap)
json.dump(info, open(f"{out}/int8_timing.json", "w"), indent=1)
print(f"{'op':34s} {'us':>9s} {'MB':>8s} {'GB/s':>8s}")
for r in rows:
    print(f"{r['op']:34s} {r['us']:9.2f} {r['bytes'] / 1e6:8.2f} {r['gbps']:8.0f}")
print(f"selected-page overlap int8 vs bf16 (random keys): {overlap:.3f}")
