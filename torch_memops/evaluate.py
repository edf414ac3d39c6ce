"""Accuracy of page selectors against dense attention: the ``torch-memops eval`` harness.

Two tasks, for any Hugging Face model that :func:`torch_memops.hf.enable` supports and any text:

* **Teacher-forced next-token agreement.** A window of the text is prefilled (dense, once per
  window, shared by every configuration through ``session.new_cache(prefix)``); then ``steps``
  decode steps are fed the text's own next tokens through the cache under test. At each step the
  next-token distribution is compared with dense attention's: top-1 agreement, mean
  KL(dense || selector) and the perplexity of the text's actual next tokens.
* **Passkey retrieval** (the filler-text task of Mohtashami & Jaggi 2023, as Quest evaluates it):
  a 5-digit key hidden at a depth of a filler text, prefilled dense; the question is fed one token
  at a time and the answer decoded greedily, all through the cache under test. A trial is correct
  when the answer holds the key; every cell prints its Wilson 95 % interval.

Every configuration is a selector (a registered method, optionally with ``key=value`` overrides of
:class:`~torch_memops.hf.MemopsConfig`, e.g. ``quest:group_reduce=sum``) at a token budget. Each
row also carries the bytes that one decode step reads (page summaries scored plus keys and values
attended, over all layers), so that selectors are compared at the same budget and at the same
bytes read. The result is a JSON document and, with matplotlib installed, a plot of quality
against budget and against bytes read per selector. See ``docs/accuracy.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Variant", "parse_variant", "wilson_interval", "bytes_per_step", "prefill", "teacher_forced_logits",
           "text_task", "passkey_task", "evaluate", "format_tables", "markdown_tables", "plot", "add_arguments", "main", "DEFAULT_SELECTORS"]

DEFAULT_SELECTORS = ("oracle", "oracle:group_reduce=sum", "oracle_head", "quest", "quest:group_reduce=sum",
                     "quest_head", "mean", "mean_head", "streaming", "random")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
# MemopsConfig fields that a variant may override, and how to read their values.
_OVERRIDES = {"page_size": int, "dense_layers": int, "sink_pages": int, "recent_pages": int, "group_reduce": str,
              "top_p": float}


# ------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """A selector and its settings: ``method`` plus MemopsConfig overrides, at any budget."""

    label: str
    method: str
    overrides: Tuple[Tuple[str, object], ...] = ()

    def config(self, budget: int, base: Dict[str, object]):
        from torch_memops import hf

        settings = dict(base)
        settings.update(self.overrides)
        return hf.MemopsConfig(method=self.method, token_budget=budget, **settings)


def parse_variant(text: str) -> Variant:
    """``"method"`` or ``"method:key=value,key=value"`` (keys: page_size, dense_layers, sink_pages,
    recent_pages, group_reduce, top_p)."""
    method, _, rest = text.partition(":")
    overrides = []
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _OVERRIDES:
            raise ValueError(f"selector {text!r}: override {item!r} must be key=value with key in {sorted(_OVERRIDES)}")
        overrides.append((key, _OVERRIDES[key](value)))
    return Variant(label=text, method=method, overrides=tuple(overrides))


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); ``(0, 1)`` for no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def is_adaptive(method: str) -> bool:
    """Whether ``method`` selects a varying number of pages (``budget_pages`` is its maximum)."""
    return bool(getattr(_method(method), "adaptive_budget", False))


def _method(method: str):
    from torch_memops.hf import methods

    return methods.get_method(method)


def _method_traits(method: str) -> Tuple[int, bool, bool]:
    """``(summary representatives per page, per-query-head selection, dense key scoring)``."""
    entry = _method(method)
    return entry.representatives, bool(getattr(entry, "per_query_head", False)), bool(getattr(entry, "scores_dense_keys", False))


def bytes_per_step(model, config, context: int, attended: Optional[float] = None) -> Dict[str, int]:
    """Bytes one decode step at ``context`` cached tokens reads from the cache, over all layers (batch 1).

    ``summary``: page summaries scored by Compute Relevancy (``N * R * D`` elements per kv head;
    a selector that scores the keys themselves, the oracle, reads ``S * D`` but is an evaluation
    bound, and that is reported apart as ``oracle_keys``); ``kv``: keys and values attended (per
    kv head ``min(k * P, S)`` tokens, per query head for a per-query-head selection, every token in
    a dense layer). Element size is the model's dtype. ``attended``: the tokens that the sparse
    layers attended in one step, summed over layers and selection rows (an adaptive-budget selector
    reads fewer than ``k * P``; the harness passes what it counted, averaged over steps and rows).
    """
    text = _text_config(model)
    layers, hq, hkv = text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // hq
    element = next(model.parameters()).element_size()
    dense_layers = min(config.dense_layers, layers)
    sparse_layers = layers - dense_layers
    pages = -(-context // config.page_size)
    reps, per_head, dense_keys = _method_traits(config.method)
    if config.method == "dense":  # selects every token through the sparse path
        per_row = context
    else:
        per_row = min(config.budget_pages * config.page_size, context)
    rows = hq if per_head else hkv
    sparse_tokens = sparse_layers * rows * per_row if attended is None else attended
    kv = element * head_dim * 2 * (dense_layers * hkv * context + sparse_tokens)
    summary = element * head_dim * sparse_layers * hkv * pages * reps
    oracle_keys = element * head_dim * sparse_layers * hkv * context if dense_keys else 0
    # A two-stage selector (quest_rerank) reads its candidates' keys to rerank them.
    factor = getattr(_method(config.method), "candidate_factor", 0)
    candidate_keys = element * head_dim * sparse_layers * hkv * min(factor * per_row, context) if factor else 0
    return {"summary": summary, "kv": kv, "candidate_keys": candidate_keys, "total": summary + kv + candidate_keys,
            "oracle_keys": oracle_keys,
            "dense": element * head_dim * 2 * layers * hkv * context}


# ------------------------------------------------------------------------------------------------
# Running the model
# ------------------------------------------------------------------------------------------------


def prefill(model, input_ids: torch.Tensor):
    """Dense prefill of ``input_ids [B, S]`` (no padding); returns per-layer ``(keys, values)``."""
    from transformers import DynamicCache

    from torch_memops import hf

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{hf.cache_argument(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def attended_tokens(cache) -> Optional[torch.Tensor]:
    """``int64 [B]``: tokens the last decode step attended in the sparse layers of a MemopsCache,
    summed over layers and selection rows (kv or query heads); ``None`` if no layer recorded one."""
    counts = [layer.attended_tokens().sum(-1) for layer in getattr(cache, "layers", ())
              if getattr(layer, "sparse", False) and getattr(layer, "last_selection", None) is not None]
    return torch.stack(counts).sum(0) if counts else None


def teacher_forced_logits(model, cache, fed: torch.Tensor, steps: int, tally: Optional[list] = None) -> torch.Tensor:
    """``steps`` one-token forwards on ``cache``: the tokens of ``fed [B, n]`` first, then greedy ones.

    Returns ``float32 [B, steps, vocab]``; ``[:, i]`` predicts the token after the ``i``-th one fed.
    ``tally``: a list that gets :func:`attended_tokens` of every step (for an adaptive budget).
    """
    from torch_memops import hf

    argument = hf.cache_argument(model)
    token = fed[:, :1]
    logits = []
    with torch.no_grad():
        for step in range(steps):
            out = model(input_ids=token, use_cache=True, **{argument: cache})
            logits.append(out.logits[:, -1].float())
            if tally is not None:
                tally.append(attended_tokens(cache))
            token = fed[:, step + 1:step + 2] if step + 1 < fed.shape[1] else logits[-1].argmax(-1, keepdim=True)
    return torch.stack(logits, dim=1)


def _runs(model, prefix, plans: Sequence[Tuple[Variant, Sequence[int], str]], base, context: int,
          run: Callable, seed: int, log=print):
    """``run(cache)`` on a dense cache and on a MemopsCache per planned (variant, budget), all from ``prefix``.

    ``plans``: ``(variant, budgets, table)``; budgets at or above ``context`` (the selection would
    be every page) and settings that MemopsConfig rejects (a budget below the forced sink + recent
    pages) are left out. Dense attention runs through the same cache with every layer dense
    (``sparse_apply`` over all tokens), which CI checks against SDPA. Returns
    ``[(variant or None, budget or None, table, result)]``.
    """
    from torch_memops import hf

    layers = _text_config(model).num_hidden_layers
    dense = hf.MemopsConfig(method="quest", token_budget=base.get("page_size", 16) * 2,
                            page_size=base.get("page_size", 16), dense_layers=layers)
    with hf.enable(model, dense) as session:
        results = [(None, None, "dense", run(session.new_cache(prefix)))]
    for variant, budgets, table in plans:
        for budget in budgets:
            if budget >= context:
                continue
            try:
                config = variant.config(budget, base)
            except ValueError as error:
                log(f"skipped {variant.label} at budget {budget}: {error}")
                continue
            torch.manual_seed(seed)
            with hf.enable(model, config) as session:
                results.append((variant, budget, table, run(session.new_cache(prefix))))
    return results


def _windows(tokens: List[int], window: int, count: int) -> List[List[int]]:
    if len(tokens) < window:
        raise ValueError(f"the text holds {len(tokens)} tokens, fewer than the {window} one window needs "
                         "(context + steps + 1)")
    if count == 1:
        return [tokens[:window]]
    stride = (len(tokens) - window) // (count - 1)
    return [tokens[i * stride:i * stride + window] for i in range(count)]


def _row(variant: Optional[Variant], budget: Optional[int], model, base, context: int,
         attended: Optional[float] = None) -> dict:
    from torch_memops import hf

    if variant is None:
        config = hf.MemopsConfig(**{**base, "dense_layers": _text_config(model).num_hidden_layers})
        bytes_read = bytes_per_step(model, config, context)
        return {"selector": "dense", "method": "dense", "budget": None, "bytes_read": bytes_read,
                "config": None}
    config = variant.config(budget, base)
    row = {"selector": variant.label, "method": variant.method, "budget": budget,
           "bytes_read": bytes_per_step(model, config, context, attended),
           "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "placement"}}
    if attended is not None:
        row["attended_tokens"] = attended  # per step, over the sparse layers and selection rows
    return row


def text_task(model, tokens: List[int], context: int, steps: int, windows: int, plans, base,
              seed: int, log=print) -> List[dict]:
    """Teacher-forced agreement over ``windows`` windows of ``context + steps + 1`` tokens.

    The windows are the rows of one batch: one prefill and one forward per decode step serve all.
    """
    ids = torch.tensor(_windows(tokens, context + steps + 1, windows))
    start = time.perf_counter()
    prefix = prefill(model, ids[:, :context])
    prefill_s = time.perf_counter() - start
    forced, targets = ids[:, context:context + steps], ids[:, context + 1:context + steps + 1]

    def run(cache):
        tally = []
        logits = teacher_forced_logits(model, cache, forced, steps, tally)
        counted = [t for t in tally if t is not None]
        return logits, (float(torch.stack(counted).double().mean()) if counted else None)

    runs = _runs(model, prefix, plans, base, context, run, seed, log)
    dense_logp = torch.log_softmax(runs[0][3][0], -1)
    dense_top = dense_logp.argmax(-1)
    dense_nll = float(-dense_logp.gather(-1, targets[..., None]).sum())
    per_run = []
    for variant, budget, table, (logits, attended) in runs:
        logp = torch.log_softmax(logits, -1)
        adaptive = variant is not None and is_adaptive(variant.method)
        per_run.append({"table": table, **_row(variant, budget, model, base, context, attended if adaptive else None),
                        "agree": int((logp.argmax(-1) == dense_top).sum()), "positions": windows * steps,
                        "kl_sum": float((dense_logp.exp() * (dense_logp - logp)).sum()),
                        "nll_sum": float(-logp.gather(-1, targets[..., None]).sum()), "dense_nll_sum": dense_nll})
    log(f"text context {context}, {windows} windows: prefill {prefill_s:.0f} s, "
        f"{len(runs)} runs in {time.perf_counter() - start - prefill_s:.0f} s")
    rows = []
    for entry in per_run:
        n = entry.pop("positions")
        agree, kl, nll, dense_nll = (entry.pop(k) for k in ("agree", "kl_sum", "nll_sum", "dense_nll_sum"))
        low, high = wilson_interval(agree, n)
        rows.append({**entry, "context": context, "positions": n, "top1_agreement": agree / n,
                     "top1_ci95": [low, high], "mean_kl": kl / n, "perplexity": math.exp(nll / n),
                     "perplexity_ratio": math.exp((nll - dense_nll) / n)})
    return rows


def passkey_prompt(tokenizer, context: int, depth: float, key: int):
    """``(haystack_ids [1, S], question_ids [1, Q])``: about ``context`` tokens, the key at ``depth``."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = tokenizer(PASSKEY_QUESTION, add_special_tokens=False).input_ids
    fixed = len(tokenizer(PASSKEY_INTRO + needle, add_special_tokens=False).input_ids) + len(question)
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    repeats = max((context - fixed) // filler_tokens, 1)
    before = round(repeats * depth)
    haystack = PASSKEY_INTRO + FILLER * before + needle + FILLER * (repeats - before)
    return (torch.tensor([tokenizer(haystack, add_special_tokens=False).input_ids]), torch.tensor([question]))


def passkey_task(model, tokenizer, context: int, depths: Sequence[float], trials: int, new_tokens: int,
                 plans, base, seed: int, log=print) -> List[dict]:
    """One row per (trial, configuration); ``trials`` keys per depth, drawn from ``seed``.

    Prompts of equal length (the filler is the same, only the key and its depth differ) run as the
    rows of one batch.
    """
    rng = random.Random(f"{seed}-{context}")
    prompts: Dict[int, list] = {}
    for depth in depths:
        for trial in range(trials):
            key = rng.randrange(10000, 100000)
            haystack, question = passkey_prompt(tokenizer, context, depth, key)
            prompts.setdefault(haystack.shape[1], []).append((depth, trial, key, haystack, question))
    rows = []
    for group in prompts.values():
        start = time.perf_counter()
        haystacks, question = torch.cat([p[3] for p in group]), group[0][4]
        prefix = prefill(model, haystacks)
        steps = question.shape[1] + new_tokens - 1
        length = haystacks.shape[1] + question.shape[1]
        runs = _runs(model, prefix, plans, base, length,
                     lambda cache: teacher_forced_logits(model, cache, question.expand(len(group), -1), steps),
                     seed, log)
        for variant, budget, _, logits in runs:
            row = _row(variant, budget, model, base, length)
            for (depth, trial, key, _, _), answer_logits in zip(group, logits):
                answer = tokenizer.decode(answer_logits[question.shape[1] - 1:].argmax(-1).tolist())
                rows.append({**row, "context": context, "tokens": length, "depth": depth, "trial": trial,
                             "key": key, "answer": answer.strip(), "correct": str(key) in answer})
        log(f"passkey context {length}: {len(group)} prompts in {time.perf_counter() - start:.0f} s")
    rows.sort(key=lambda r: (r["depth"], r["trial"]))
    return rows


def summarise_passkey(rows: List[dict]) -> List[dict]:
    """Accuracy with its Wilson 95 % interval per (context, selector, budget), over all depths and per depth."""
    cells: Dict[tuple, List[int]] = {}
    for row in rows:
        for depth in ("all", row["depth"]):
            cell = cells.setdefault((row["context"], depth, row["selector"], row["budget"]), [0, 0])
            cell[0] += row["correct"]
            cell[1] += 1
    out = []
    for (context, depth, selector, budget), (ok, n) in cells.items():
        out.append({"context": context, "depth": depth, "selector": selector, "budget": budget, "correct": ok,
                    "trials": n, "accuracy": ok / n, "ci95": list(wilson_interval(ok, n))})
    return out


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------


def _sweep_variants(args) -> List[Variant]:
    """The knob sweeps: each knob value other than the base one, for each sweep selector."""
    variants = []
    base = {"page_size": args.page_size, "dense_layers": args.dense_layers, "sink_pages": args.sink_pages,
            "recent_pages": args.recent_pages}
    sweeps = {"page_size": args.sweep_page_sizes, "dense_layers": args.sweep_dense_layers,
              "sink_pages": args.sweep_sink_pages, "recent_pages": args.sweep_recent_pages}
    for name in args.sweep_selectors:
        selector = parse_variant(name)
        for knob, values in sweeps.items():
            for value in values or ():
                if value == base[knob] or dict(selector.overrides).get(knob) is not None:
                    continue
                overrides = dict(selector.overrides)
                overrides[knob] = value
                label = f"{selector.method}:" + ",".join(f"{k}={v}" for k, v in overrides.items())
                variants.append(Variant(label=label, method=selector.method, overrides=tuple(overrides.items())))
    return variants


def load_model(model_path: Optional[str], dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, name)``: a local/hub Hugging Face model, or the embedded SmolLM2-135M."""
    if model_path is None:
        from torch_memops.cli import DEFAULT_GGUF, load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        return model, tokenizer, f"SmolLM2-135M-Instruct ({DEFAULT_GGUF}, dequantised to {dtype})"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, tokenizer, model_path


def evaluate(model, tokenizer, args, log=print, save: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the tasks ``args`` names (see :func:`add_arguments`); returns the JSON-ready result."""
    import transformers

    from torch_memops.cli import english_text

    start = time.perf_counter()
    base = {"page_size": args.page_size, "dense_layers": args.dense_layers, "sink_pages": args.sink_pages,
            "recent_pages": args.recent_pages}
    main_variants = [parse_variant(name) for name in args.selectors]
    sweep_variants = _sweep_variants(args)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else english_text()
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("json", "plot", "func", "command")},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "text": [], "sweeps": [], "passkey": [], "passkey_summary": [],
    }

    def checkpoint():
        result["seconds"] = time.perf_counter() - start
        if save is not None:
            save(result)

    plans = ([(variant, args.budgets, "main") for variant in main_variants]
             + [(variant, args.sweep_budgets, "sweep") for variant in sweep_variants])
    if args.text_contexts:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        for context in args.text_contexts:
            rows = text_task(model, tokens, context, args.steps, args.windows, plans, base, args.seed, log)
            result["text"] += [row for row in rows if row["table"] != "sweep"]
            result["sweeps"] += [row for row in rows if row["table"] == "sweep"]
            checkpoint()
    passkey_variants = ([parse_variant(name) for name in args.passkey_selectors]
                        if args.passkey_selectors is not None else main_variants)
    passkey_plans = [(variant, args.budgets, "main") for variant in passkey_variants]
    for context in args.passkey_contexts:
        result["passkey"] += passkey_task(model, tokenizer, context, args.passkey_depths, args.passkey_trials,
                                          args.passkey_new_tokens, passkey_plans, base, args.seed, log)
        result["passkey_summary"] = summarise_passkey(result["passkey"])
        checkpoint()
    checkpoint()
    return result


def format_tables(result: dict) -> str:
    lines = []
    for key, title in (("text", "teacher-forced agreement with dense"), ("sweeps", "knob sweeps")):
        if not result[key]:
            continue
        lines.append(f"\n{title} (top-1 with its Wilson 95 % interval; ppl ratio = selector / dense; "
                     "MB = bytes read per decode step)")
        lines.append(f"{'context':>7} {'selector':<34} {'budget':>6} {'top-1':>7} {'ci95':>15} {'KL':>8} "
                     f"{'ppl':>8} {'ratio':>7} {'MB':>7}")
        for row in result[key]:
            low, high = row["top1_ci95"]
            lines.append(f"{row['context']:>7} {row['selector']:<34} {str(row['budget'] or '-'):>6} "
                         f"{row['top1_agreement']:>7.4f} {f'[{low:.3f},{high:.3f}]':>15} {row['mean_kl']:>8.5f} "
                         f"{row['perplexity']:>8.3f} {row['perplexity_ratio']:>7.4f} "
                         f"{row['bytes_read']['total'] / 1e6:>7.2f}")
    if result["passkey_summary"]:
        lines.append("\npasskey retrieval (accuracy over depths; Wilson 95 % interval)")
        lines.append(f"{'context':>7} {'depth':>5} {'selector':<34} {'budget':>6} {'ok/n':>7} {'acc':>6} {'ci95':>15}")
        for row in result["passkey_summary"]:
            low, high = row["ci95"]
            lines.append(f"{row['context']:>7} {str(row['depth']):>5} {row['selector']:<34} "
                         f"{str(row['budget'] or '-'):>6} {row['correct']:>3}/{row['trials']:<3} "
                         f"{row['accuracy']:>6.3f} {f'[{low:.3f},{high:.3f}]':>15}")
    return "\n".join(lines)


def markdown_tables(result: dict) -> str:
    """The tables of :func:`format_tables` as Markdown, one column group per budget."""
    lines = []
    for key in ("text", "sweeps"):
        rows = result.get(key) or []
        for context in sorted({row["context"] for row in rows}):
            here = [row for row in rows if row["context"] == context]
            budgets = sorted({row["budget"] for row in here if row["budget"] is not None})
            lines.append(f"\n{key}, context {context}, {here[0]['positions']} positions: top-1 agreement "
                         "[Wilson 95 %] / perplexity ratio to dense / MB read per decode step\n")
            lines.append("| selector | " + " | ".join(f"{b}" for b in budgets) + " |")
            lines.append("|---|" + "---:|" * len(budgets))
            for selector in dict.fromkeys(row["selector"] for row in here):
                cells = []
                for budget in budgets:
                    row = next((r for r in here if r["selector"] == selector and r["budget"] == budget), None)
                    if row is None and selector == "dense":
                        row = next(r for r in here if r["selector"] == "dense")
                    if row is None:
                        cells.append("")
                        continue
                    low, high = row["top1_ci95"]
                    cells.append(f"{100 * row['top1_agreement']:.1f} [{100 * low:.1f}, {100 * high:.1f}] / "
                                 f"{row['perplexity_ratio']:.4f} / {row['bytes_read']['total'] / 1e6:.1f}")
                lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    summary = [row for row in result.get("passkey_summary") or [] if row["depth"] == "all"]
    for context in sorted({row["context"] for row in summary}):
        here = [row for row in summary if row["context"] == context]
        budgets = sorted({row["budget"] for row in here if row["budget"] is not None})
        lines.append(f"\npasskey, context {context}: correct / trials [Wilson 95 %] over all depths\n")
        lines.append("| selector | " + " | ".join(f"{b}" for b in budgets) + " |")
        lines.append("|---|" + "---:|" * len(budgets))
        for selector in dict.fromkeys(row["selector"] for row in here):
            cells = []
            for budget in budgets:
                row = next((r for r in here if r["selector"] == selector and r["budget"] in (budget, None)), None)
                cells.append("" if row is None else
                             f"{row['correct']}/{row['trials']} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]")
            lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Quality against budget and against bytes read, one line per selector; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["text"]
    contexts = sorted({row["context"] for row in rows})
    if not contexts:
        return False
    figure, axes = plt.subplots(2 * len(contexts), 2, figsize=(12, 8 * len(contexts)), squeeze=False)
    for c, context in enumerate(contexts):
        here = [row for row in rows if row["context"] == context]
        dense = next(row for row in here if row["selector"] == "dense")
        for r, (metric, label) in enumerate((("top1_agreement", "top-1 agreement with dense"),
                                             ("perplexity_ratio", "perplexity / dense"))):
            for x_index, (x_name, x_label) in enumerate((("budget", "token budget"),
                                                         ("bytes", "MB read per decode step"))):
                axis = axes[2 * c + r, x_index]
                for selector in dict.fromkeys(row["selector"] for row in here if row["selector"] != "dense"):
                    points = sorted((row["budget"], row["bytes_read"]["total"] / 1e6, row[metric])
                                    for row in here if row["selector"] == selector)
                    xs = [p[0] if x_name == "budget" else p[1] for p in points]
                    axis.plot(xs, [p[2] for p in points], marker="o",
                              linestyle="--" if selector.startswith("oracle") else "-", label=selector)
                axis.axhline(dense[metric], color="black", linewidth=0.8, label="dense")
                if x_name == "budget":
                    axis.set_xscale("log", base=2)
                axis.set_xlabel(x_label)
                axis.set_ylabel(label)
                axis.set_title(f"context {context}")
                axis.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ------------------------------------------------------------------------------------------------
# Command line (``torch-memops eval``)
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from torch_memops import hf

    parser.add_argument("--model", help="local path (or hub name) of a Hugging Face model; default: the "
                        "embedded SmolLM2-135M-Instruct")
    parser.add_argument("--text", help="text file for the agreement task (default: the licence texts)")
    parser.add_argument("--selectors", nargs="*", default=list(DEFAULT_SELECTORS),
                        help="method[:key=value,...], e.g. quest:group_reduce=sum")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--page-size", type=int, default=hf.MemopsConfig().page_size,
                        help="tokens per page (default: MemopsConfig's)")
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--sink-pages", type=int, default=1)
    parser.add_argument("--recent-pages", type=int, default=1)
    parser.add_argument("--text-contexts", type=int, nargs="*", default=[8192 - 129])
    parser.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps per window")
    parser.add_argument("--windows", type=int, default=2, help="text windows (one dense prefill each)")
    parser.add_argument("--sweep-selectors", nargs="*", default=["quest", "oracle"])
    parser.add_argument("--sweep-budgets", type=int, nargs="*", default=[1024])
    parser.add_argument("--sweep-page-sizes", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--sweep-dense-layers", type=int, nargs="*", default=[0, 1, 4])
    parser.add_argument("--sweep-sink-pages", type=int, nargs="*", default=[0, 4])
    parser.add_argument("--sweep-recent-pages", type=int, nargs="*", default=[4])
    parser.add_argument("--passkey-contexts", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument("--passkey-selectors", nargs="+", help="selectors of the passkey task (default: --selectors)")
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--passkey-trials", type=int, default=4, help="keys per depth and context")
    parser.add_argument("--passkey-new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="write the result here (rewritten after every task)")
    parser.add_argument("--plot", type=Path, help="PNG of quality against budget and bytes (needs matplotlib)")
    return parser


def run(args) -> dict:
    """The ``torch-memops eval`` command: load, evaluate, print the tables, write JSON and the plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer, name = load_model(args.model)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    def save(result):
        result["model"] = name
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))

    result = evaluate(model, tokenizer, args, log=log, save=save)
    print(format_tables(result))
    if args.plot is not None:
        if plot(result, args.plot):
            log(f"plot written to {args.plot}")
        else:
            log("no plot: matplotlib is not installed or there are no text rows")
    log(f"total {result['seconds']:.0f} s")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="torch-memops eval", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
