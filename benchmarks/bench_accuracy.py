"""Accuracy of the memops pipeline against dense attention on SmolLM2-135M-Instruct (real weights).

Two tasks, each at several contexts and token budgets; the dense prefill of every prompt is run
once and shared by all budgets (prefill is dense in the pipeline too):

* Long real English text (the licence texts of /usr/share/common-licenses): after a prefill of
  ``C`` tokens, ``T`` decode steps are fed the text's own tokens; at each step the pipeline's
  next-token distribution is compared with dense attention's: top-1 agreement, mean
  KL(dense || pipeline) in nats, and the perplexity of the text under both.
* Passkey retrieval (the filler-text task of Mohtashami & Jaggi 2023, used by Quest): a 5-digit
  key hidden at a depth of a "The grass is green..." filler. The filler is prefilled; the question
  is fed one token at a time and the answer decoded greedily, all through the cache under test.

    python benchmarks/bench_accuracy.py --json results/accuracy.json      # the CPU plan, ~20 min
    python benchmarks/bench_accuracy.py --quick                            # a smoke run, ~2 min
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

from torch_memops import hf
from torch_memops.cli import english_tokens, load_smollm2

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def prefill(model, input_ids):
    """Dense prefill; returns (last-position logits, per-layer (keys, values))."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, **{hf.cache_argument(model): cache})
    prefix = [(layer.keys, layer.values) for layer in cache.layers]
    return out.logits[:, -1].float(), prefix


def dense_cache(model, prefix):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache


def decode(model, cache, fed, steps):
    """``steps`` one-token forwards: the tokens of ``fed`` (``[1, n]``) first, then greedy ones.

    Returns the ``[steps, vocab]`` logits; row ``i`` predicts the token after the ``i``-th fed one.
    """
    token = fed[:, :1]
    logits = []
    with torch.no_grad():
        for step in range(steps):
            out = model(input_ids=token, use_cache=True, **{hf.cache_argument(model): cache})
            logits.append(out.logits[:, -1].float())
            token = fed[:, step + 1:step + 2] if step + 1 < fed.shape[1] else logits[-1].argmax(-1, keepdim=True)
    return torch.cat(logits)


def pipeline_runs(model, prefix, budgets, args, run):
    """``run(cache)`` with a dense cache, then with a MemopsCache per budget, all from one prefill."""
    results = {"dense": run(dense_cache(model, prefix))}
    for budget in budgets:
        config = hf.MemopsConfig(method=args.method, page_size=args.page_size, token_budget=budget,
                                 dense_layers=args.dense_layers)
        with hf.enable(model, config) as session:
            results[budget] = run(session.new_cache(prefix))
    return results


def text_task(model, tokenizer, context, steps, budgets, args):
    tokens = torch.tensor([english_tokens(tokenizer, context + steps + 1)])
    start = time.perf_counter()
    _, prefix = prefill(model, tokens[:, :context])
    forced = tokens[:, context:context + steps]
    targets = tokens[0, context + 1:context + steps + 1]
    logits = pipeline_runs(model, prefix, budgets, args,
                           lambda cache: decode(model, cache, forced, steps))
    dense_logp = torch.log_softmax(logits["dense"], -1)
    rows = []
    for name, got in logits.items():
        logp = torch.log_softmax(got, -1)
        rows.append({
            "context": context, "budget": name, "positions": steps,
            "top1_agreement": float((got.argmax(-1) == logits["dense"].argmax(-1)).float().mean()),
            "mean_kl": float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()),
            "perplexity": math.exp(float(-logp[torch.arange(steps), targets].mean())),
        })
    print(f"text context {context}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def passkey_prompt(tokenizer, context, depth, key):
    """``(haystack_ids, question_ids)``: about ``context`` tokens in all, the key at ``depth`` (0..1)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = tokenizer(PASSKEY_QUESTION, add_special_tokens=False).input_ids
    fixed = len(tokenizer(PASSKEY_INTRO + needle, add_special_tokens=False).input_ids) + len(question)
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    repeats = max((context - fixed) // filler_tokens, 1)
    before = round(repeats * depth)
    haystack = PASSKEY_INTRO + FILLER * before + needle + FILLER * (repeats - before)
    return (torch.tensor([tokenizer(haystack, add_special_tokens=False).input_ids]), torch.tensor([question]))


def passkey_task(model, tokenizer, context, depths, budgets, args, rng):
    """The haystack is prefilled (dense); the question is then fed one token at a time and the answer
    generated greedily, so that the question and every answer token go through the cache under test
    (as in Quest's evaluation, which decodes the prompt's tail token by token)."""
    rows = []
    for depth in depths:
        key = rng.randrange(10000, 100000)
        haystack, question = passkey_prompt(tokenizer, context, depth, key)
        start = time.perf_counter()
        _, prefix = prefill(model, haystack)
        steps = question.shape[1] + args.passkey_new_tokens - 1
        generated = pipeline_runs(model, prefix, budgets, args, lambda cache: decode(model, cache, question, steps))
        for name, logits in generated.items():
            text = tokenizer.decode(logits[question.shape[1] - 1:].argmax(-1).tolist())
            rows.append({"context": haystack.shape[1] + question.shape[1], "depth": depth, "budget": name,
                         "key": key, "answer": text.strip(), "correct": str(key) in text})
        print(f"passkey context {haystack.shape[1] + question.shape[1]} depth {depth}: "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def summarise_passkey(rows):
    table = {}
    for row in rows:
        entry = table.setdefault((row["context"], row["budget"]), [0, 0])
        entry[0] += row["correct"]
        entry[1] += 1
    return [{"context": c, "budget": b, "accuracy": ok / n, "trials": n} for (c, b), (ok, n) in table.items()]


def print_tables(result):
    print(f"\nnext-token agreement over real text (method {result['settings']['method']}, page "
          f"{result['settings']['page_size']})")
    print(f"{'context':>8} {'budget':>7} {'top-1 agree':>12} {'mean KL':>10} {'ppl':>8}")
    for row in result["text"]:
        print(f"{row['context']:>8} {row['budget']:>7} {row['top1_agreement']:>12.3f} {row['mean_kl']:>10.4f} "
              f"{row['perplexity']:>8.2f}")
    print("\npasskey retrieval accuracy")
    print(f"{'context':>8} {'budget':>7} {'accuracy':>9} {'trials':>7}")
    for row in result["passkey_summary"]:
        print(f"{row['context']:>8} {row['budget']:>7} {row['accuracy']:>9.2f} {row['trials']:>7}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--text-contexts", type=int, nargs="*", default=[2048, 8000])
    parser.add_argument("--text-steps", type=int, default=24, help="decode positions compared per context")
    parser.add_argument("--passkey-contexts", type=int, nargs="*", default=[2048, 8000])
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--passkey-new-tokens", type=int, default=6)
    parser.add_argument("--method", default="quest", choices=("quest", "mean"))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.text_contexts, args.text_steps = [64, 128], [512], 4
        args.passkey_contexts, args.passkey_depths, args.passkey_new_tokens = [512], [0.5], 6

    import transformers

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "text": [], "passkey": [],
    }

    def save():
        result["passkey_summary"] = summarise_passkey(result["passkey"])
        result["seconds"] = time.perf_counter() - start
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))

    for context in args.text_contexts:
        budgets = [b for b in args.budgets if b < context]
        result["text"] += text_task(model, tokenizer, context, args.text_steps, budgets, args)
        save()
    rng = random.Random(args.seed)
    for context in args.passkey_contexts:
        budgets = [b for b in args.budgets if b < context]
        result["passkey"] += passkey_task(model, tokenizer, context, args.passkey_depths, budgets, args, rng)
        save()
    print_tables(result)
    print(f"\ntotal {result['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
