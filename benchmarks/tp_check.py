"""Tensor parallelism: the pipeline on each rank's local heads gives the tokens of one device.

    torchrun --nproc-per-node 2 benchmarks/tp_check.py [--json out.json]

A small random Llama (8 query / 4 kv heads, float32) is saved once and loaded on every rank with
transformers' ``distributed_config=DistributedConfig(tp_size=world_size)`` (the model's own
tensor-parallel plan; the interface of transformers 5.17 and 5.24, which replaces the deprecated
``tp_plan=`` argument of ``from_pretrained``): q/k/v projections are split by heads, so each rank's attention
sees ``Hkv / world_size`` kv heads and its MemopsCache holds only those. Greedy ``generate()``
with the pipeline (full token budget) on the sharded model must give the same tokens as dense
attention on one device (rank 0 loads the unsharded model). Runs on CUDA with NCCL, or on CPU
with gloo when there is no GPU. Exits 1 when the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from torch_memops import hf
from torch_memops.hf import fused_projections

NEW_TOKENS = 24


def save_random_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def greedy(model, input_ids, config=None):
    with torch.no_grad():
        if config is None:
            return model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False), None
        with hf.enable(model, config):
            out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        return out.sequences, out["cache"] if "cache" in out else out["past_key_values"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--context", type=int, default=1000)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, DistributedConfig

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    shared = [tempfile.mkdtemp(prefix="memops_tp_") if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    if rank == 0:
        save_random_model(shared[0])
    dist.barrier()

    model = AutoModelForCausalLM.from_pretrained(shared[0], distributed_config=DistributedConfig(tp_size=world),
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
    input_ids = torch.randint(0, 1024, (1, args.context), generator=torch.Generator().manual_seed(1)).to(device)
    full_budget = hf.MemopsConfig(page_size=16, token_budget=8192, dense_layers=1)
    tp_memops, cache = greedy(model, input_ids, full_budget)
    tp_dense, _ = greedy(model, input_ids)
    local_kv_heads = [layer.keys.shape[1] for layer in cache.layers]

    with hf.enable(model, full_budget):  # modules whose projections were fused (hooked ones are not)
        fused = sum(1 for m in model.modules() if fused_projections.fused_weights(m))
    result = {"world_size": world, "device": str(device), "local_kv_heads_per_layer": local_kv_heads,
              "fused_projection_modules": fused}
    ok = all(h == model.config.num_key_value_heads // world for h in local_kv_heads)
    if rank == 0:
        single = AutoModelForCausalLM.from_pretrained(shared[0], dtype=torch.float32,
                                                      attn_implementation="sdpa").to(device).eval()
        one_device_dense, _ = greedy(single, input_ids)
        one_device_memops, _ = greedy(single, input_ids, full_budget)
        result.update(
            tp_memops_equals_one_device=bool(torch.equal(tp_memops, one_device_dense)),
            tp_dense_equals_one_device=bool(torch.equal(tp_dense, one_device_dense)),
            one_device_memops_equals_dense=bool(torch.equal(one_device_memops, one_device_dense)),
            new_tokens=NEW_TOKENS, context=args.context,
        )
        ok = ok and result["tp_memops_equals_one_device"]
        print(json.dumps(result, indent=2))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
    flags = [None] * world
    dist.all_gather_object(flags, ok)
    dist.destroy_process_group()
    return 0 if all(flags) else 1


if __name__ == "__main__":
    sys.exit(main())
