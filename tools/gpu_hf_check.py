"""GPU check of the static MemopsCache (run by tools/gpu_hf.sh): graph-captured and compiled
generate() tokens equal eager tokens, and a decode step makes no device-to-host sync.

Random Llama (bf16, logits made peaked so that greedy ties are rare), quest, budget 256, page 16,
batch 2 with one row left-padded. Writes gpu_hf.json to $OUT and prints a table last.
"""

import json
import os
import sys
import time
import traceback

import torch
import transformers

from torch_memops import hf

OUT = os.environ.get("OUT", "/tmp/memops-gpu-out")
# GPU_HF_DRY_RUN=1: the same script on the CPU with a tiny model, to find errors before a GPU run.
DRY_RUN = os.environ.get("GPU_HF_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
NEW_TOKENS = 4 if DRY_RUN else 24
results = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": "cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name(0), "checks": {}, "decode_ms": {}}


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def set_sync_debug_mode(mode):
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def record(name, ok, detail=""):
    results["checks"][name] = {"ok": bool(ok), "detail": str(detail)}
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def model_and_inputs():
    hidden, layers, length = (128, 2, 100) if DRY_RUN else (1024, 6, 1500)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                      max_position_embeddings=8192, initializer_range=0.1,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    ids = torch.randint(0, 4096, (2, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :length // 2] = 0
    return model, ids, mask


def generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, **kwargs)[:, ids.shape[1]:]


def per_token_ms(model, ids, mask, repeats=3, **kwargs):
    """(t(1 + n new tokens) - t(1 new token)) / n, median of `repeats`, after one warm-up call."""
    def timed(n):
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
        synchronize()
        return time.perf_counter() - start
    timed(1 + NEW_TOKENS)
    samples = sorted((timed(1 + NEW_TOKENS) - timed(1)) / NEW_TOKENS for _ in range(1 if DRY_RUN else repeats))
    return 1e3 * samples[len(samples) // 2]


def check_deferred_stop(model, ids, mask, compile_config):
    """The deferred stop check (MemopsConfig.defer_stop_check, on by default) gives the tokens of
    the per-step check, also when EOS stops generation early: one step then runs past the end and
    the returned static cache is cropped back. One row; EOS is the token it makes at step 5 (2 in a dry run)."""
    ids = ids[:1]
    runs = {}
    eos = None
    for name, defer in (("reference", False), ("per-step", False), ("deferred", True)):
        config = hf.MemopsConfig(method="quest", page_size=16, token_budget=256, dense_layers=1,
                                 defer_stop_check=defer)
        stop = {} if eos is None else dict(eos_token_id=eos)
        with hf.enable(model, config), torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 cache_implementation="static", compile_config=compile_config,
                                 return_dict_in_generate=True, **stop)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        runs[name] = (out.sequences, int(cache.get_seq_length()), [layer.seq_lens_host.tolist() for layer in cache.layers])
        if eos is None:
            eos = int(out.sequences[0, ids.shape[1] + min(5, NEW_TOKENS - 2)])
    (seq_d, seen_d, lens_d), (seq_s, seen_s, lens_s) = runs["deferred"], runs["per-step"]
    made = seq_s.shape[1] - ids.shape[1]
    record("ours: deferred stop check (EOS) tokens and returned cache == per-step check",
           torch.equal(seq_d, seq_s) and seen_d == seen_s and lens_d == lens_s and made < NEW_TOKENS,
           f"{made} of {NEW_TOKENS} tokens made before EOS; cache length {seen_d} vs {seen_s}")


def main():
    model, ids, mask = model_and_inputs()
    config = hf.MemopsConfig(method="quest", page_size=16, token_budget=256, dense_layers=1)
    graphs = transformers.CompileConfig(backend="cudagraphs", mode=None, fullgraph=True)
    inductor = transformers.CompileConfig(fullgraph=True)  # mode="reduce-overhead": inductor + CUDA graphs
    stock_eager = generate(model, ids, mask, cache_implementation="static", disable_compile=True)
    stock_compiled = generate(model, ids, mask, cache_implementation="static", compile_config=inductor)
    record("stock static: inductor tokens == eager tokens (reference for bf16 numerics)",
           torch.equal(stock_compiled, stock_eager))
    with hf.enable(model, config) as session:
        dynamic = generate(model, ids, mask)
        eager = generate(model, ids, mask, cache_implementation="static", disable_compile=True)
        record("ours: static eager tokens == dynamic eager tokens", torch.equal(eager, dynamic))
        for name, compile_config in (("cudagraphs", graphs), ("inductor+cudagraphs", inductor)):
            try:
                torch._dynamo.reset()
                model.__dict__.pop("_compiled_call", None)
                with torch._dynamo.config.patch(error_on_recompile=False):
                    tokens = generate(model, ids, mask, cache_implementation="static", compile_config=compile_config)
                record(f"ours: generate() compiled ({name}) tokens == eager tokens",
                       torch.equal(tokens, eager) and hasattr(model, "_compiled_call"),
                       f"{(tokens == eager).float().mean().item():.3f} of tokens equal")
            except Exception as error:  # record and go on: the other checks still say something
                record(f"ours: generate() compiled ({name}) tokens == eager tokens", False, repr(error)[:300])
                traceback.print_exc()

        # No device-to-host sync in a decode step: eager and compiled, under sync debug "error".
        arg = hf.cache_argument(model)
        for compiled in (False, True):
            name = "compiled (fullgraph, cudagraphs)" if compiled else "eager"
            try:
                capacity = ids.shape[1] + 8
                cache = session.new_cache(max_cache_len=capacity)
                forward = torch.compile(model.forward, fullgraph=True, backend="cudagraphs") if compiled else model.forward
                # One mask of the cache's capacity for every step (positions past the current
                # token are masked by causality): a mask growing by a token per step is an input
                # of a new shape per step, which a recorded CUDA graph cannot take (cudagraph
                # trees fail copying it in: "size of tensor a (1502) must match ... (1503)").
                # generate() hands the compiled forward a fixed-size mask too.
                step_mask = torch.cat([mask, mask.new_ones(2, capacity - mask.shape[1])], dim=1)
                with torch.no_grad():
                    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{arg: cache})
                    token = out.logits[:, -1:].argmax(-1)
                    for step in range(4):
                        if step == 3:
                            synchronize()
                            set_sync_debug_mode("error")
                        try:
                            out = forward(input_ids=token, attention_mask=step_mask, use_cache=True, **{arg: cache})
                            token = out.logits[:, -1:].argmax(-1)
                        finally:
                            set_sync_debug_mode(0)
                record(f"ours: {name} decode step makes no device-to-host sync", True)
            except Exception as error:
                record(f"ours: {name} decode step makes no device-to-host sync", False, repr(error)[:300])
                traceback.print_exc()

        torch._dynamo.reset()
        model.__dict__.pop("_compiled_call", None)
        for name, kwargs in (("ours eager (dynamic)", {}),
                             ("ours eager (static)", dict(cache_implementation="static", disable_compile=True)),
                             ("ours compiled (static, inductor+cudagraphs)",
                              dict(cache_implementation="static", compile_config=inductor))):
            results["decode_ms"][name] = per_token_ms(model, ids, mask, **kwargs)
    check_deferred_stop(model, ids, mask, inductor)
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    results["decode_ms"]["stock eager (DynamicCache)"] = per_token_ms(model, ids, mask)
    results["decode_ms"]["stock compiled (static, inductor+cudagraphs)"] = per_token_ms(
        model, ids, mask, cache_implementation="static", compile_config=inductor)

    with open(os.path.join(OUT, "gpu_hf.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}")
    print("random Llama 6 layers, hidden 1024, 16/4 heads of 64, bf16, batch 2 x 1500 (one row left-padded), "
          f"quest budget 256, {NEW_TOKENS} new tokens")
    for name, check in results["checks"].items():
        print(f"{'PASS' if check['ok'] else 'FAIL':<5}{name} {check['detail']}")
    for name, ms in results["decode_ms"].items():
        print(f"{ms:8.2f} ms/token  {name}")
    return 0 if all(c["ok"] for n, c in results["checks"].items() if not n.startswith("stock")) else 1


if __name__ == "__main__":
    sys.exit(main())
