"""The decode GEMVs of one Llama-3-8B layer, separate and fused (what ``MemopsConfig.fuse_projections``
decides): q, k, v as three products against one over their stacked weights, gate and up as two
against one; batch 1 and 8, bf16, eager and torch.compile'd. Each time is the median CUDA-graph
replay of 8 layers' worth of distinct weights (so that L2 holds none of them), per layer, with the
weight bytes at the copy peak measured in the same run.

    PYTHONPATH=$PWD python benchmarks/bench_projections.py     # GPU; prints one line per case
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_replay, measured_peak_gbps, median_ms  # noqa: E402

H, HQ, HKV, D, INTERMEDIATE = 4096, 32, 8, 128, 14336
LAYERS = 8


def main():
    if not torch.cuda.is_available():
        print("bench_projections: needs a CUDA device")
        return
    peak = measured_peak_gbps()
    dt = torch.bfloat16
    linear = torch.nn.functional.linear

    def weights(rows):
        return [torch.randn(rows, H, device="cuda", dtype=dt) for _ in range(LAYERS)]

    for batch in (1, 8):
        x = torch.randn(batch, H, device="cuda", dtype=dt)
        wq, wk, wv = weights(HQ * D), weights(HKV * D), weights(HKV * D)
        wqkv = [torch.cat(w) for w in zip(wq, wk, wv)]
        wg, wu = weights(INTERMEDIATE), weights(INTERMEDIATE)
        wgu = [torch.cat(w) for w in zip(wg, wu)]
        cases = {
            "q,k,v separate": (lambda: [(linear(x, a), linear(x, b), linear(x, c)) for a, b, c in zip(wq, wk, wv)],
                               wqkv[0].numel()),
            "qkv fused": (lambda: [linear(x, w) for w in wqkv], wqkv[0].numel()),
            "q alone": (lambda: [linear(x, w) for w in wq], wq[0].numel()),
            "k alone": (lambda: [linear(x, w) for w in wk], wk[0].numel()),
            "gate,up separate": (lambda: [(linear(x, a), linear(x, b)) for a, b in zip(wg, wu)], wgu[0].numel()),
            "gate_up fused": (lambda: [linear(x, w) for w in wgu], wgu[0].numel()),
        }
        for name, (fn, elements) in cases.items():
            for tag, f in (("eager", fn), ("compiled", torch.compile(fn))):
                us = median_ms(graph_replay(f)) * 1e3 / LAYERS
                gbps = elements * 2 / (us * 1e-6) / 1e9
                print(f"M={batch} {name:18s} {tag:9s} {us:7.2f} us/layer  {gbps:6.0f} GB/s  "
                      f"{100 * gbps / peak:5.1f} % of copy peak", flush=True)
        del wq, wk, wv, wqkv, wg, wu, wgu
    print("copy peak", round(peak), "GB/s", torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
