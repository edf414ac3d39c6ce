"""A target for Nsight Compute: the decode step's kernels (topk_relevancy's scoring with its fused
selection, sparse_apply's split and merge kernels) at Llama-3-8B shapes, 32K context, budget 2048,
page 16, ten calls, so that ncu can skip the first and profile one of each:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        -k regex:"sparse_apply|relevancy_tc" --launch-skip 15 --launch-count 3 \\
        python3 tools/ncu_step.py BATCH
"""
import sys

import torch

import torch_memops as memops

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
S, Hq, Hkv, D, P, budget = 32768, 32, 8, 128, 16, 2048
generator = torch.Generator(device="cuda").manual_seed(0)
keys = torch.randn(batch, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=generator)
values = torch.randn_like(keys)
query = torch.randn(batch, Hq, D, device="cuda", dtype=torch.bfloat16, generator=generator)
pages = S // P
indices = torch.stack([torch.randperm(pages, device="cuda", generator=generator)[: budget // P].sort().values
                       for _ in range(batch * Hkv)]).view(batch, Hkv, -1).to(torch.int32)
summary = memops.prepare_memory(keys, P)
for _ in range(10):
    memops.topk_relevancy(query, summary, budget // P, sink_pages=1, recent_pages=2)
    memops.sparse_apply(query, keys, values, indices, P)
torch.cuda.synchronize()
print("ok")
