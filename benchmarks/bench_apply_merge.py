"""sparse_apply's split merge in the split kernel (``MEMOPS_CUDA_FUSED_MERGE=1``) against the
separate merge kernel (the default), tensor-core and portable kernels, as CUDA-graph replays at the
decode cells of issue 11 (bf16, page 16); fused and separate must give the same bits.

    PYTHONPATH=$PWD python benchmarks/bench_apply_merge.py OUT_DIR     # GPU; writes OUT_DIR/applymerge.json
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_switch, graph_replay, kernel_times_us, median_ms, short_kernel_names  # noqa: E402

from torch_memops import ops  # noqa: E402

P = 16
cells = [("llama3-8b", 32, 8, 1, 32768, 2048), ("llama3-8b", 32, 8, 8, 32768, 2048),
         ("llama3-8b", 32, 8, 1, 131072, 4096), ("llama3-8b", 32, 8, 8, 131072, 4096),
         ("qwen-7to1", 28, 4, 8, 32768, 2048), ("llama2-7b", 32, 32, 1, 32768, 2048),
         ("llama2-7b", 32, 32, 8, 32768, 2048)]
rows = []
for model, Hq, Hkv, B, S, budget in cells:
    D, N, k = 128, S // P, budget // P
    keys = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    query = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.rand(B, Hkv, N, device="cuda").topk(k, dim=-1).indices.sort(-1).values.int()
    apply = lambda: ops.sparse_apply(query, keys, values, idx, P)  # noqa: E731
    row = {"cell": f"{model} B{B} {S // 1024}K budget {budget}"}
    for name, switches in [("fused", {"MEMOPS_CUDA_FUSED_MERGE": "1"}), ("separate", {"MEMOPS_CUDA_FUSED_MERGE": "0"}),
                           ("portable fused", {"MEMOPS_CUDA_TENSOR_CORES": "0", "MEMOPS_CUDA_FUSED_MERGE": "1"}),
                           ("portable separate", {"MEMOPS_CUDA_TENSOR_CORES": "0",
                                                  "MEMOPS_CUDA_FUSED_MERGE": "0"})]:
        with contextlib.ExitStack() as stack:
            for key, value in switches.items():
                stack.enter_context(cuda_switch(key, value))
            out = apply()
            row[name + " graph us"] = round(median_ms(graph_replay(apply)) * 1e3, 1)
            row[name + " kernels"] = short_kernel_names(kernel_times_us(apply))
            row[name + " out"] = out
    row["fused == separate (bits)"] = bool(torch.equal(row["fused out"][0], row["separate out"][0])
                                           and torch.equal(row["fused out"][1], row["separate out"][1]))
    row["portable fused == separate (bits)"] = bool(
        torch.equal(row["portable fused out"][0], row["portable separate out"][0])
        and torch.equal(row["portable fused out"][1], row["portable separate out"][1]))
    for name in ["fused", "separate", "portable fused", "portable separate"]:
        del row[name + " out"]
    rows.append(row)
    del keys, values
    torch.cuda.empty_cache()
Path(sys.argv[1], "applymerge.json").write_text(json.dumps(rows, indent=1))
print(f"\n{torch.cuda.get_device_name()}: sparse_apply, CUDA graph replay, median us")
print(f"{'cell':34s} {'tc fused':>9s} {'tc sep':>8s} {'port fused':>11s} {'port sep':>9s}  bits equal")
for r in rows:
    print(f"{r['cell']:34s} {r['fused graph us']:9.1f} {r['separate graph us']:8.1f} "
          f"{r['portable fused graph us']:11.1f} {r['portable separate graph us']:9.1f}  "
          f"{r['fused == separate (bits)']}/{r['portable fused == separate (bits)']}")
