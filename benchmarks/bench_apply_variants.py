"""sparse_apply's kernel variants, chosen by the extension's MEMOPS_CUDA_* switches, side by side as
CUDA-graph replays at the decode cells of issue 11 (bf16, page 16, random pages): the default
tensor-core split kernel and merge kernel, other split plans (``MEMOPS_CUDA_APPLY_BLOCKS``), the
merge in the split kernel (``MEMOPS_CUDA_FUSED_MERGE=1``) and the portable kernels. Variants that
run the same arithmetic must give the same bits; every variant's error against a float32 reference
is reported. Also the bytes floor (selected K and V at the copy peak measured in the same run).

Two times per variant: "graph us", one call replayed after the L2 is overwritten (by a fill, whose
dirty lines the call then evicts), and "layers us", a graph of one call on each of several layers'
caches (as a model's decode step runs them: every layer reads pages that the last few layers'
traffic pushed out of L2, and nothing is dirty), divided by the layers.

    PYTHONPATH=$PWD python benchmarks/bench_apply_variants.py OUT_DIR [VARIANT ...]
        # GPU; writes OUT_DIR/apply_variants.json; variants by name (default: all)
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cuda_switch, device_info, graph_replay, kernel_times_us, measured_peak_gbps,  # noqa: E402
                    median_ms, short_kernel_names)

from torch_memops import ops  # noqa: E402

P = 16
CELLS = [("llama3-8b", 32, 8, 1, 32768, 2048), ("llama3-8b", 32, 8, 8, 32768, 2048),
         ("llama3-8b", 32, 8, 1, 131072, 4096), ("llama3-8b", 32, 8, 8, 131072, 4096),
         ("qwen-7to1", 28, 4, 8, 32768, 2048), ("llama2-7b", 32, 32, 1, 32768, 2048),
         ("llama2-7b", 32, 32, 8, 32768, 2048)]
# name -> switches; "same bits as" pairs are checked below.
VARIANTS = {
    "default": {},
    "blocks 1": {"MEMOPS_CUDA_APPLY_BLOCKS": "1"},
    "blocks 2": {"MEMOPS_CUDA_APPLY_BLOCKS": "2"},
    "blocks 8": {"MEMOPS_CUDA_APPLY_BLOCKS": "8"},
    "fused merge": {"MEMOPS_CUDA_FUSED_MERGE": "1"},
    "fused merge, blocks 1": {"MEMOPS_CUDA_FUSED_MERGE": "1", "MEMOPS_CUDA_APPLY_BLOCKS": "1"},
    "fused merge, blocks 2": {"MEMOPS_CUDA_FUSED_MERGE": "1", "MEMOPS_CUDA_APPLY_BLOCKS": "2"},
    "portable": {"MEMOPS_CUDA_TENSOR_CORES": "0"},
}
SAME_BITS = [("default", "fused merge"),
             ("blocks 1", "fused merge, blocks 1"), ("blocks 2", "fused merge, blocks 2")]


def layer_count(selected_bytes: int) -> int:
    """Layers whose selected pages add up to at least four L2s, so that a layer finds none of its
    pages still cached when its turn comes again (2..32)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return min(32, max(2, -(-4 * l2 // selected_bytes)))


def reference(query, keys, values, idx):
    """float32 attention over the selected pages (every token of a selected page is valid)."""
    B, Hq, D = query.shape
    Hkv = keys.shape[1]
    tokens = (idx.long().unsqueeze(-1) * P + torch.arange(P, device=idx.device)).flatten(2)
    k = keys.gather(2, tokens.unsqueeze(-1).expand(-1, -1, -1, D)).float()
    v = values.gather(2, tokens.unsqueeze(-1).expand(-1, -1, -1, D)).float()
    q = query.float().view(B, Hkv, Hq // Hkv, D)
    w = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1)
    return (w @ v).view(B, Hq, D)


def main():
    out_dir = Path(sys.argv[1])
    chosen = sys.argv[2:] or list(VARIANTS)
    peak = measured_peak_gbps()
    rows = []
    for model, Hq, Hkv, B, S, budget in CELLS:
        D, N, k = 128, S // P, budget // P
        selected_bytes = 2 * B * Hkv * budget * D * 2
        layers = []
        for _ in range(layer_count(selected_bytes)):
            keys = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
            idx = torch.rand(B, Hkv, N, device="cuda").topk(k, dim=-1).indices.sort(-1).values.int()
            layers.append((keys, torch.randn_like(keys), idx))
        keys, values, idx = layers[0]
        query = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        expected = reference(query, keys, values, idx)
        apply = lambda: ops.sparse_apply(query, keys, values, idx, P)  # noqa: E731
        apply_layers = lambda: [ops.sparse_apply(query, *layer, P) for layer in layers]  # noqa: E731
        floor_us = selected_bytes / (peak * 1e9) * 1e6
        row = {"cell": f"{model} B{B} {S // 1024}K budget {budget}", "floor us": round(floor_us, 1),
               "layers": len(layers)}
        outs = {}
        for name in chosen:
            with contextlib.ExitStack() as stack:
                for key, value in VARIANTS[name].items():
                    stack.enter_context(cuda_switch(key, value))
                outs[name] = apply()
                row[name + " graph us"] = round(median_ms(graph_replay(apply)) * 1e3, 1)
                row[name + " layers us"] = round(median_ms(graph_replay(apply_layers)) * 1e3 / len(layers), 1)
                row[name + " kernels"] = short_kernel_names(kernel_times_us(apply))
            row[name + " max err"] = float((outs[name][0].float() - expected).abs().max())
        for a, b in SAME_BITS:
            if a in outs and b in outs:
                row[f"{a} == {b} (bits)"] = bool(torch.equal(outs[a][0], outs[b][0])
                                                 and torch.equal(outs[a][1], outs[b][1]))
        rows.append(row)
        print(f"{row['cell']:34s} floor {floor_us:6.1f} us  " + "  ".join(
            f"{name} {row[name + ' graph us']:.1f} / {row[name + ' layers us']:.1f}" for name in chosen),
            flush=True)
        del keys, values, layers, outs
        torch.cuda.empty_cache()
    result = {"device": device_info(), "copy_peak_gbps": round(peak, 1), "rows": rows}
    (out_dir / "apply_variants.json").write_text(json.dumps(result, indent=1))
    print(f"\n{torch.cuda.get_device_name()}: sparse_apply, CUDA graph replay, median us, one call "
          f"after an L2 fill / per layer of a graph over layers (copy peak {peak:.0f} GB/s)")
    for r in rows:
        bits = [f"{key}: {value}" for key, value in r.items() if key.endswith("(bits)")]
        print(f"{r['cell']:34s} " + " ".join(f"{n}={r[n + ' graph us']}/{r[n + ' layers us']}" for n in chosen) +
              "  " + "; ".join(bits))


if __name__ == "__main__":
    main()
