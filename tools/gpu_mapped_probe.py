"""Probe: can sparse_apply read the selected pages straight from pinned host memory (UVA)?

On a 64-bit CUDA system page-locked memory from cudaHostAlloc (what ``pin_memory=True`` gives) is
mapped into the GPU's address space at the same address, so a kernel can read it over PCIe. This
probe aliases pinned K/V as CUDA tensors (``torch_memops.hf.mapped.device_alias``), runs
``sparse_apply`` on them and on GPU-resident copies, checks the outputs are bit-equal and times
both (median device time, benchmarks/common.py), checks a CUDA-graph replay and a decode write
through the alias, and measures the zero-copy streaming read bandwidth next to the pinned H2D
copy engine's. JSON to --out. On the GPU machine, after ``STAGES=build bash tools/gpu_bench.sh``:
``cd /tmp/memops-src && PYTHONPATH=$PWD python3 tools/gpu_mapped_probe.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from torch_memops import ops
from torch_memops.hf.mapped import device_alias

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import median_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"card": torch.cuda.get_device_name()}
    B, Hkv, Hq, S, D, P = 4, 8, 32, 32768, 128, 16
    host_k = torch.randn(B, Hkv, S, D).to(torch.bfloat16).pin_memory()
    host_v = torch.randn(B, Hkv, S, D).to(torch.bfloat16).pin_memory()
    map_k, map_v = device_alias(host_k, torch.device("cuda")), device_alias(host_v, torch.device("cuda"))
    result["alias_ptr_equal"] = map_k.data_ptr() == host_k.data_ptr()
    dev_k, dev_v = host_k.cuda(), host_v.cuda()
    result["alias_reads_equal"] = bool(torch.equal(map_k[0, 0, :64], dev_k[0, 0, :64]))
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").to(torch.bfloat16)
    cells = []
    for budget in (1024, 2048):
        k = budget // P
        scores = torch.rand(B, Hkv, S // P, device="cuda")
        scores[..., -1] = 2
        idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
        out_dev, _ = ops.sparse_apply(q, dev_k, dev_v, idx, P, seq_lens=lens)
        out_map, _ = ops.sparse_apply(q, map_k, map_v, idx, P, seq_lens=lens)
        nbytes = B * Hkv * k * P * D * 2 * 2
        t_dev = median_ms(lambda: ops.sparse_apply(q, dev_k, dev_v, idx, P, seq_lens=lens))
        t_map = median_ms(lambda: ops.sparse_apply(q, map_k, map_v, idx, P, seq_lens=lens))
        # Batch 1: the latency case.
        t_map1 = median_ms(lambda: ops.sparse_apply(q[:1], map_k[:1], map_v[:1], idx[:1], P, seq_lens=lens[:1]))
        t_dev1 = median_ms(lambda: ops.sparse_apply(q[:1], dev_k[:1], dev_v[:1], idx[:1], P, seq_lens=lens[:1]))
        cell = {"budget": budget, "bytes": nbytes, "equal": bool(torch.equal(out_dev, out_map)),
                "device_us": t_dev * 1e3, "mapped_us": t_map * 1e3, "mapped_gbps": nbytes / t_map / 1e6,
                "b1_device_us": t_dev1 * 1e3, "b1_mapped_us": t_map1 * 1e3, "b1_mapped_gbps": nbytes / B / t_map1 / 1e6}
        cells.append(cell)
        print(cell, flush=True)
    result["sparse_apply"] = cells
    # CUDA graph over the mapped buffers.
    idx = torch.sort(torch.randperm(S // P, device="cuda")[:64]).values.to(torch.int32)
    idx = idx.expand(B, Hkv, -1).contiguous()
    static_out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.sparse_apply(q, map_k, map_v, idx, P, seq_lens=lens)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out.copy_(ops.sparse_apply(q, map_k, map_v, idx, P, seq_lens=lens)[0])
    g.replay()
    torch.cuda.synchronize()
    ref, _ = ops.sparse_apply(q, dev_k, dev_v, idx, P, seq_lens=lens)
    result["graph_equal"] = bool(torch.equal(static_out, ref))
    # A decode write through the alias lands in host memory.
    new = torch.randn(B, Hkv, D, device="cuda").to(torch.bfloat16)
    pos = torch.tensor([5, 100, 2000, S - 1], device="cuda")
    rows = torch.arange(B, device="cuda")
    map_k[rows, :, pos] = new
    torch.cuda.synchronize()
    result["write_through_alias"] = bool(torch.equal(host_k[torch.arange(B), :, pos.cpu()], new.cpu()))
    # Streaming read bandwidth: zero-copy kernel vs the copy engine.
    flat = map_k.view(-1)
    sink = torch.empty_like(dev_k).view(-1)
    t_zc = median_ms(lambda: torch.add(flat, 0, out=sink))
    t_ce = median_ms(lambda: sink.copy_(host_k.view(-1), non_blocking=True))
    result["zero_copy_stream_gbps"] = flat.numel() * 2 / t_zc / 1e6
    result["copy_engine_gbps"] = flat.numel() * 2 / t_ce / 1e6
    print(json.dumps(result, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mapped_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
