"""Per-token decode time of ``model.generate()``, stock transformers against the memops pipeline.

Measured as a user would see it: the time of ``generate()`` for ``1 + n`` new tokens minus its
time for one new token, divided by ``n`` (the prefill cancels out), CUDA synchronised around
each call, median of ``--repeats`` pairs after warm-up (the warm-up also compiles). Every row runs
in the same process, one after the other, with the compiled state reset between rows (each
compiled row starts from a fresh ``torch._dynamo`` as a new process would); the rows the targets
compare run first for every cell, then ``ours-dense-compiled`` and ``stock-static-flex``:

- ``stock-dynamic``: stock ``generate()`` with its default ``DynamicCache``, eager, SDPA.
- ``stock-static``: stock ``generate()`` with a ``StaticCache``; transformers auto-compiles the
  decode forward (its default ``CompileConfig``: inductor, ``mode="reduce-overhead"``).
- ``stock-static-flex``: the same with ``attn_implementation="flex_attention"``, which reads
  grouped keys/values without expanding them (transformers' SDPA path repeats them per query
  head whenever there is a mask, as there always is with a static cache): the extra stock
  configuration tried.
- ``ours-eager``: ``generate()`` inside ``torch_memops.hf.enable`` (eager MemopsCache).
- ``ours-static-eager``: the compileable MemopsCache, not compiled (``disable_compile=True``):
  tells what the static cache alone changes.
- ``ours-compiled``: the same with the compileable MemopsCache (``cache_implementation="static"``
  or ``session.new_cache(max_cache_len=N)``), auto-compiled by transformers.
- ``ours-dense-compiled``: ``method="dense"`` through the compiled cache: tells graph gains from
  sparsity gains.
- ``ours-compiled-sync``: ours compiled with ``defer_stop_check=False``: the stop check every step,
  as stock ``generate()`` does on CUDA (the host waits for each step before it prepares the next).
- ``stock-static-deferred``: stock static, auto-compiled, with transformers' ``DeferredStopCheck``
  turned on for CUDA by patching its rule (not a stock setting; these runs cannot stop before
  ``max_new_tokens``, so no cache is ever cropped): what the host-side change alone gives stock,
  so that ours is not credited with it.
- ``ours-int8-compiled``: ours compiled with ``method="quest_int8"`` (the bound-preserving int8
  page summary: scoring reads half the bytes). The floor columns stay those of the 16-bit summary.
- ``ours-compiled-unfused``: ours compiled with ``fuse_projections=False``: q/k/v and gate/up as
  separate products, as stock runs them, so that the fused products' share of ours is told apart
  (every other ``ours-*`` row fuses them).

Next to them the bandwidth floor of a decode step at the copy peak measured in the same run:
the weights read once (all parameters but the embedding table, of which ``B`` rows) plus the
KV bytes the step must read: every token of every layer (dense), or, for the pipeline, the
dense layers in full and, in the sparse layers, the page summaries plus the selected tokens.

``--prefill random`` (default): a prefill of 32K-128K tokens takes tens of seconds, so the
prompt's keys/values are random and written straight into the cache, which ``generate()``
receives as its cache (``past_key_values`` in transformers 5.17, ``cache`` in 5.24) with a
prompt one token longer than the cache: its prefill is that one token. The static caches are
built once per row and rewound to the prompt length before every call (``StaticCache`` keeps
its fill level in ``cumulative_length``), so compiled graphs keep their static addresses.
``--prefill real`` runs real prefills (``cache_implementation="static"`` for the static rows),
exactly the user's call; use it at small contexts.

    python benchmarks/bench_e2e.py                        # GPU: all cells, Llama-3-8B shapes
    python benchmarks/bench_e2e.py --cells 1x32K,8x32K    # a subset
    python benchmarks/bench_e2e.py --cpu-smoke            # tiny random Llama on the CPU

Writes ``bench_e2e{--tag}.json`` and ``.md`` to ``--out`` ($MEMOPS_BENCH_OUT, default
benchmarks/results) after every row, so that a run stopped by ``MEMOPS_BENCH_DEADLINE`` (a
Unix time; rows that would start after ``deadline - --row-margin`` seconds are skipped) still
leaves its results. Host speed moves the eager rows 2x between machines: compare rows of one
run only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, cpu_info, cpu_peak_gbps, device_info,  # noqa: E402
                    measured_peak_gbps)

from torch_memops import hf  # noqa: E402
from torch_memops.workload import fill_random, random_layers, reset_compiled  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072 + 4096)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096)
GPU_CELLS = "1x8K,8x8K,1x32K,8x32K,1x128K,4x128K"
QUICK_CELLS = "1x32K,8x32K"
SMOKE_CELLS = "1x512,2x512"


@dataclass(frozen=True)
class RowSpec:
    """One way of running ``generate()``."""

    name: str
    what: str
    ours: bool
    static: bool  # a compileable cache: transformers auto-compiles the decode forward
    attn: str = "sdpa"
    method: str = "quest"
    compile: bool = True  # False: the static cache with generate(disable_compile=True)
    defer: Optional[bool] = None  # read generate()'s stop flag a step late (None: the row's default)
    fuse: bool = True  # ours: MemopsConfig.fuse_projections (q/k/v and gate/up as one product each)


ROWS = [
    RowSpec("stock-dynamic", "stock generate(), DynamicCache, eager, sdpa", ours=False, static=False),
    RowSpec("stock-static", "stock generate(), StaticCache, auto-compiled, sdpa", ours=False, static=True),
    RowSpec("stock-static-flex", "stock generate(), StaticCache, auto-compiled, flex_attention", ours=False,
            static=True, attn="flex_attention"),
    RowSpec("ours-eager", "generate() in hf.enable, eager MemopsCache", ours=True, static=False),
    RowSpec("ours-static-eager", "generate() in hf.enable, static MemopsCache, not compiled", ours=True,
            static=True, compile=False),
    RowSpec("ours-compiled", "generate() in hf.enable, static MemopsCache, auto-compiled", ours=True, static=True),
    RowSpec("ours-dense-compiled", "generate() in hf.enable, static MemopsCache, method='dense', auto-compiled",
            ours=True, static=True, method="dense"),
    RowSpec("ours-compiled-sync", "ours-compiled with defer_stop_check=False (a stop check every step)", ours=True,
            static=True, defer=False),
    RowSpec("stock-static-deferred", "stock-static with transformers' DeferredStopCheck patched on for CUDA",
            ours=False, static=True, defer=True),
    RowSpec("ours-int8-compiled", "ours-compiled with method='quest_int8' (int8 page summaries)", ours=True,
            static=True, method="quest_int8"),
    RowSpec("ours-compiled-unfused", "ours-compiled with fuse_projections=False (q/k/v, gate/up apart, as stock)",
            ours=True, static=True, fuse=False),
]
ROW_NAMES = [row.name for row in ROWS]
# Run first, for every cell: the rows that the targets compare.
PRIMARY_ROWS = ("stock-dynamic", "stock-static", "ours-eager", "ours-static-eager", "ours-compiled")


@dataclass(frozen=True)
class Cell:
    batch: int
    context: int

    @property
    def label(self) -> str:
        c = self.context
        return f"B{self.batch} {c // 1024}K" if c % 1024 == 0 else f"B{self.batch} S{c}"


def parse_cells(text: str) -> list[Cell]:
    """``"1x32K,8x32K,2x512"`` -> cells (batch x context; K = 1024)."""
    cells = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        try:
            batch, context = item.lower().split("x")
            scale = 1024 if context.endswith("k") else 1
            cells.append(Cell(int(batch), int(context.rstrip("k")) * scale))
        except ValueError:
            raise SystemExit(f"--cells: expected items like 8x32K or 2x512, got {item!r}") from None
    return cells


# ---------------------------------------------------------------------------------------------
# Bytes a decode step must read.

def weight_bytes(model, batch: int) -> int:
    """Parameters a decode step reads: all but the input embedding table, of which ``batch`` rows."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    row = embedding.shape[1] * embedding.element_size()
    return total - (0 if tied else embedding.numel() * embedding.element_size()) + (0 if tied else batch * row)


def kv_bytes_dense(config, batch: int, context: int, elem: int) -> int:
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * config.head_dim * elem


def kv_bytes_sparse(config, batch: int, context: int, elem: int, memops: hf.MemopsConfig) -> int:
    """Dense layers in full; each sparse layer its min/max page summary plus the selected tokens."""
    layers = config.num_hidden_layers
    dense = min(memops.dense_layers, layers)
    pages = -(-context // memops.page_size)
    selected = min(memops.budget_pages * memops.page_size, context)
    per_row = config.num_key_value_heads * config.head_dim * elem
    sparse_layer = batch * per_row * (2 * pages + 2 * selected)
    return dense * kv_bytes_dense(config, batch, context, elem) // layers + (layers - dense) * sparse_layer


# ---------------------------------------------------------------------------------------------
# Model, caches, compiled state.

def build_model(shape: dict, layers: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


@contextlib.contextmanager
def stock_deferred_stop_check(on: bool):
    """``on``: transformers' ``DeferredStopCheck`` for every non-assistant decode (its own rule: "mps"
    only), for the stock-static-deferred row. The stock ``StaticCache`` cannot be cropped, and the
    check would crop the cache handed in here (``crop(0)`` every step), so the check is told the
    cache is not handed back: sound here because every call makes exactly ``max_new_tokens`` and
    the step it would undo (the one past an EOS) is never run."""
    if not on:
        yield
        return
    from transformers.generation.utils import DeferredStopCheck

    original_rule, original_init = DeferredStopCheck.is_supported, DeferredStopCheck.__init__

    def init_without_cache(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
        original_init(self, input_ids, max_length, None, False, streamer)

    # CUDA only, as ours: the check records torch.Event, which the CPU backend lacks.
    DeferredStopCheck.is_supported = staticmethod(
        lambda device, cache, returned, is_assistant: device.type == "cuda" and not is_assistant)
    DeferredStopCheck.__init__ = init_without_cache
    try:
        yield
    finally:
        DeferredStopCheck.is_supported = staticmethod(original_rule)
        DeferredStopCheck.__init__ = original_init


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rewind(cache, length: int) -> None:
    """Put a filled static cache back at ``length`` tokens in place (buffer addresses unchanged).

    transformers' ``StaticLayer`` keeps its fill level in the device tensor
    ``cumulative_length``; a static MemopsCache layer in ``seen`` (tokens transformers has seen)
    and ``storage.seq_lens`` (valid tokens per row, one tensor per device). The summary of the
    page holding ``length`` is recomputed by the next decode step, which re-prepares its page.
    """
    if hasattr(cache, "rewind"):
        cache.rewind(length)
        return
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        storage = getattr(layer, "storage", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)
        elif isinstance(getattr(layer, "seen", None), torch.Tensor) and getattr(storage, "static", False):
            layer.seen.fill_(length)
            for lens in storage.seq_lens.values():
                lens.fill_(length)
        else:
            raise RuntimeError(f"cannot rewind a {type(cache).__name__}: its layers keep no device length")


# ---------------------------------------------------------------------------------------------
# Timing.

def compiled_graphs() -> int:
    """Graphs torch._dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])

@dataclass
class RowResult:
    cell: str
    row: str
    what: str
    ms_per_token: Optional[float] = None
    status: str = "ok"
    t1_s: list = field(default_factory=list)
    tn_s: list = field(default_factory=list)
    warmup_s: Optional[float] = None
    compiled: Optional[bool] = None
    tokens: Optional[list] = None
    extra: dict = field(default_factory=dict)


class Runner:
    """Runs one row of one cell: its warm-up, its timed pairs, its checks."""

    def __init__(self, model, args, device, dtype):
        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        self.cache_kwarg = hf.cache_argument(model)
        self.compile_config = None
        if device.type != "cuda":
            from transformers import CompileConfig

            # transformers compiles on CUDA only unless told; no CUDA graphs on the CPU.
            self.compile_config = CompileConfig(mode="default")
            self.compile_config._compile_all_devices = True

    def memops_config(self, spec: RowSpec) -> hf.MemopsConfig:
        return hf.MemopsConfig(method=spec.method, page_size=self.args.page_size, token_budget=self.args.budget,
                               dense_layers=self.args.dense_layers, defer_stop_check=spec.defer is not False,
                               fuse_projections=spec.fuse)

    def generate(self, inputs: dict, new_tokens: int, extra: dict):
        synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, **extra)
        synchronize(self.device)
        return time.perf_counter() - start, out

    def run(self, spec: RowSpec, cell: Cell) -> RowResult:
        args, model = self.args, self.model
        result = RowResult(cell.label, spec.name, spec.what)
        reset_compiled(model)
        free(self.device)
        model.set_attn_implementation(spec.attn)
        n = args.new_tokens
        prompt = cell.context if args.prefill == "real" else cell.context + 1
        generator = torch.Generator(device="cpu").manual_seed(2)
        input_ids = torch.randint(1, model.config.vocab_size, (cell.batch, prompt), generator=generator)
        inputs = {"input_ids": input_ids.to(self.device),
                  "attention_mask": torch.ones_like(input_ids, device=self.device)}
        compile_kwargs = {} if self.compile_config is None else {"compile_config": self.compile_config}
        max_cache_len = prompt + 1 + n
        try:
            if spec.ours:
                with hf.enable(model, self.memops_config(spec)) as session:
                    self._time(spec, cell, session, inputs, compile_kwargs, max_cache_len, result)
            else:
                with stock_deferred_stop_check(spec.defer is True):
                    self._time(spec, cell, None, inputs, compile_kwargs, max_cache_len, result)
        except Exception as error:  # a failing row must not stop the table
            result.status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            result.extra["traceback"] = traceback.format_exc(limit=4)[-1500:]
        finally:
            model.set_attn_implementation("sdpa")
            reset_compiled(model)
            free(self.device)
        return result

    def _cache_factory(self, spec: RowSpec, cell: Cell, session, max_cache_len: int):
        """``make()`` -> kwargs giving ``generate()`` a cache holding the random prompt."""
        model = self.model

        def prefix():
            return random_layers(model, cell.batch, cell.context, self.dtype, self.device)

        if not spec.static:
            def make():
                if spec.ours:
                    return {self.cache_kwarg: session.new_cache(prefix())}
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                return {self.cache_kwarg: fill_random(cache, model, cell.batch, cell.context, self.dtype,
                                                      self.device)}
            return make
        if spec.ours:
            cache = session.new_cache(prefix(), max_cache_len=max_cache_len)
        else:
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
            fill_random(cache, model, cell.batch, cell.context, self.dtype, self.device)

        def make():
            rewind(cache, cell.context)
            return {self.cache_kwarg: cache}
        return make

    def _caller(self, spec, cell, session, inputs, compile_kwargs, max_cache_len):
        """``call(new_tokens) -> (seconds, output)``: one ``generate()`` of this row, its cache made
        (or rewound) before each call."""
        if self.args.prefill == "real":
            static = {"cache_implementation": "static"} if spec.static else {}

            def make():
                return dict(static)
        else:
            make = self._cache_factory(spec, cell, session, max_cache_len)
        extra = {} if not spec.static else dict(compile_kwargs) if spec.compile else {"disable_compile": True}

        def call(new_tokens):
            kwargs = make()
            kwargs.update(extra)
            seconds, out = self.generate(inputs, new_tokens, kwargs)
            kwargs.clear()  # drop the eager caches before the next one is built
            return seconds, out

        return call

    def _time(self, spec, cell, session, inputs, compile_kwargs, max_cache_len, result):
        args = self.args
        n = args.new_tokens
        call = self._caller(spec, cell, session, inputs, compile_kwargs, max_cache_len)
        start = time.perf_counter()
        first = None
        for _ in range(args.warmup):
            _, out = call(1 + n)
            first = out if first is None else first
            call(1)
        result.warmup_s = round(time.perf_counter() - start, 2)
        result.compiled = "_compiled_call" in self.model.__dict__
        graphs_before = compiled_graphs()
        per_token = []
        out = None
        for _ in range(args.repeats):
            t1, _ = call(1)
            tn, out = call(1 + n)
            result.t1_s.append(round(t1, 5))
            result.tn_s.append(round(tn, 5))
            per_token.append((tn - t1) / n)
        result.ms_per_token = 1e3 * statistics.median(per_token)
        if result.ms_per_token <= 0:
            result.status = "noise: t(1+n) <= t(1); raise --new-tokens or --repeats"
        result.extra["graphs_compiled_while_timed"] = compiled_graphs() - graphs_before
        prompt = inputs["input_ids"].shape[1]
        result.tokens = out[:, prompt:].tolist()
        if first is not None:
            # The first call (fresh cache) and the last (a rewound static cache, or a rebuilt one)
            # must give the same greedy tokens: the rewind restores the prompt state.
            result.extra["tokens_same_first_and_last_call"] = bool(torch.equal(first, out))


# ---------------------------------------------------------------------------------------------
# Report.

def environment(device) -> dict:
    import transformers

    info = device_info() if device.type == "cuda" else cpu_info()
    host = cpu_info()["card"].removeprefix("CPU ")
    info.update(host_cpu=host, host_cpus=os.cpu_count(), transformers=transformers.__version__,
                platform=platform.platform())
    return info


def cell_summary(cell_rows: list[RowResult], floors: dict) -> dict:
    # A non-positive difference is noise (t(1) varied more than n steps cost): not a result.
    times = {r.row: r.ms_per_token for r in cell_rows if r.ms_per_token is not None and r.ms_per_token > 0}
    stock = {name: ms for name, ms in times.items() if name.startswith("stock")}
    summary = dict(floors)
    if stock:
        best = min(stock, key=stock.get)
        summary.update(fastest_stock=best, fastest_stock_ms=round(stock[best], 3))
    ours = times.get("ours-compiled")
    if ours:
        summary["ours_compiled_x_floor_sparse"] = round(ours / floors["floor_sparse_ms"], 2)
        if stock:
            summary["speedup_vs_fastest_stock"] = round(stock[best] / ours, 2)
    tokens = {r.row: r.tokens for r in cell_rows if r.tokens is not None}
    # Greedy tokens that should agree: the pipeline static/compiled vs eager, dense vs stock.
    for name, a, b in (("ours_compiled_tokens_equal_eager", "ours-compiled", "ours-eager"),
                       ("ours_static_eager_tokens_equal_eager", "ours-static-eager", "ours-eager"),
                       ("ours_dense_tokens_equal_stock", "ours-dense-compiled", "stock-dynamic"),
                       ("ours_compiled_tokens_equal_sync", "ours-compiled", "ours-compiled-sync"),
                       ("stock_deferred_tokens_equal_static", "stock-static-deferred", "stock-static"),
                       ("stock_static_tokens_equal_dynamic", "stock-static", "stock-dynamic")):
        if a in tokens and b in tokens:
            summary[name] = tokens[a] == tokens[b]
    return summary


def write_report(path_json: Path, path_md: Path, result: dict) -> None:
    path_json.write_text(json.dumps(result, indent=1))
    info = result["environment"]
    rows_by_cell: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        rows_by_cell.setdefault(row["cell"], {})[row["row"]] = row
    lines = [
        "# bench_e2e: per-token decode time of generate()", "",
        f"{result['model']}; {info.get('card')}; host CPU {info.get('host_cpu')} ({info.get('host_cpus')} cpus); "
        f"torch {info.get('torch')}, transformers {info.get('transformers')}; "
        f"measured copy peak {result['copy_peak_gbps']:.0f} GB/s.", "",
        f"ms per new token = (t(1+{result['new_tokens']}) - t(1)) / {result['new_tokens']}, median of "
        f"{result['repeats']} pairs after {result['warmup']} warm-up pair(s); prefill: {result['prefill']}; "
        f"pipeline: {result['pipeline']}.", "",
        "| cell | floor dense | floor sparse | " + " | ".join(ROW_NAMES) +
        " | fastest stock | ours-compiled vs it | ours-compiled / floor sparse |",
        "|---|---:|---:|" + "---:|" * len(ROW_NAMES) + "---|---:|---:|",
    ]
    for cell, summary in result["cells"].items():
        rows = rows_by_cell.get(cell, {})
        values = []
        for name in ROW_NAMES:
            row = rows.get(name)
            if row is None:
                values.append("")
            elif row["ms_per_token"] is None:
                values.append(row["status"].split(":")[0])
            else:
                values.append(f"{row['ms_per_token']:.2f}")
        lines.append(
            f"| {cell} | {summary['floor_dense_ms']:.2f} | {summary['floor_sparse_ms']:.2f} | "
            + " | ".join(values)
            + f" | {summary.get('fastest_stock', '')} | "
            + (f"{summary['speedup_vs_fastest_stock']:.2f}x" if "speedup_vs_fastest_stock" in summary else "")
            + " | " + (f"{summary['ours_compiled_x_floor_sparse']:.2f}x"
                       if "ours_compiled_x_floor_sparse" in summary else "") + " |")
    lines += ["", "Greedy tokens of rows that compute the same thing:", ""]
    for cell, summary in result["cells"].items():
        agree = ", ".join(f"{k} {v}" for k, v in summary.items() if "tokens_equal" in k)
        lines.append(f"- {cell}: {agree or 'n/a'}")
    lines += ["", "Rows (warm-up includes compilation; 'same tokens': first and last call of the row):", "",
              "| cell | row | ms/token | warm-up s | compiled | graphs compiled while timed | same tokens | status |",
              "|---|---|---:|---:|---|---:|---|---|"]
    for row in result["rows"]:
        ms = "" if row["ms_per_token"] is None else f"{row['ms_per_token']:.2f}"
        extra = row["extra"]
        lines.append(f"| {row['cell']} | {row['row']} | {ms} | {row['warmup_s'] or ''} | {row['compiled']} | "
                     f"{extra.get('graphs_compiled_while_timed', '')} | "
                     f"{extra.get('tokens_same_first_and_last_call', '')} | {row['status']} |")
    path_md.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", help=f"batch x context items (default {GPU_CELLS})")
    parser.add_argument("--quick", action="store_true", help=f"cells {QUICK_CELLS}")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated subset of " + ",".join(ROW_NAMES))
    parser.add_argument("--cpu-smoke", action="store_true",
                        help=f"a tiny random Llama (hidden 128, 4 layers) on the CPU, cells {SMOKE_CELLS}, budget 128, "
                             "4 new tokens")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dense-layers", type=int, default=2, help="leading layers the pipeline keeps dense")
    parser.add_argument("--new-tokens", type=int, default=16, help="n: tokens timed per call beyond the first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up pairs (t(1+n), t(1)) per row")
    parser.add_argument("--prefill", choices=("random", "real"), default="random")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--row-margin", type=float, default=45.0,
                        help="seconds a row needs at least before MEMOPS_BENCH_DEADLINE to start")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("MEMOPS_BENCH_OUT", RESULTS_DIR)))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    shape = LLAMA3_8B
    cells_text = args.cells or (QUICK_CELLS if args.quick else GPU_CELLS)
    if args.cpu_smoke:
        shape, args.device = TINY, "cpu"
        cells_text = args.cells or SMOKE_CELLS
        if args.layers == 32:
            args.layers = 4
        if args.budget == 2048:
            args.budget = 128
        if args.new_tokens == 16:
            args.new_tokens = 4
    rows = [spec for spec in ROWS if spec.name in args.rows.split(",")]
    unknown = set(args.rows.split(",")) - set(ROW_NAMES)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; the rows are {ROW_NAMES}")
    cells = parse_cells(cells_text)
    deadline = float(os.environ.get("MEMOPS_BENCH_DEADLINE", "inf"))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    info = environment(device)
    peak = measured_peak_gbps() if device.type == "cuda" else cpu_peak_gbps(256)
    model = build_model(shape, args.layers, dtype, device)
    memops = hf.MemopsConfig(page_size=args.page_size, token_budget=args.budget, dense_layers=args.dense_layers)
    elem = torch.finfo(dtype).bits // 8
    result = {
        "model": ("Llama-3-8B shapes" if shape is LLAMA3_8B else "tiny Llama (CPU smoke)")
                 + f", {args.layers} layers, random weights, {args.dtype}",
        "shape": shape, "layers": args.layers, "dtype": args.dtype, "environment": info,
        "copy_peak_gbps": round(peak, 1),
        "pipeline": f"quest, budget {args.budget}, page {args.page_size}, sink {memops.sink_pages}, "
                    f"recent {memops.recent_pages}, dense_layers {memops.dense_layers}",
        "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup, "prefill": args.prefill,
        "cells": {}, "rows": [], "skipped": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path_json, path_md = args.out / f"bench_e2e{args.tag}.json", args.out / f"bench_e2e{args.tag}.md"
    print(f"{info.get('card')} | host {info.get('host_cpu')} | torch {info['torch']} | transformers "
          f"{info['transformers']} | copy peak {peak:.0f} GB/s | {result['model']}", flush=True)
    runner = Runner(model, args, device, dtype)
    floors, cell_rows = {}, {}
    for cell in cells:
        w = weight_bytes(model, cell.batch)
        dense = w + kv_bytes_dense(model.config, cell.batch, cell.context, elem)
        sparse = w + kv_bytes_sparse(model.config, cell.batch, cell.context, elem, memops)
        floors[cell] = {"batch": cell.batch, "context": cell.context, "weight_bytes": w,
                        "floor_dense_bytes": dense, "floor_sparse_bytes": sparse,
                        "floor_dense_ms": round(dense / peak / 1e6, 3),
                        "floor_sparse_ms": round(sparse / peak / 1e6, 3)}
        cell_rows[cell] = []
        result["cells"][cell.label] = cell_summary([], floors[cell])
    # The rows the targets compare, for every cell, before the extra rows: a run cut short by
    # its deadline still has them.
    primary = [spec for spec in rows if spec.name in PRIMARY_ROWS]
    order = [(cell, spec) for spec_list in (primary, [r for r in rows if r not in primary])
             for cell in cells for spec in spec_list]
    for cell, spec in order:
        if time.time() > deadline - args.row_margin:
            result["skipped"].append(f"{cell.label} {spec.name}: deadline")
            print(f"{cell.label:<10} {spec.name:<20} skipped: deadline", flush=True)
            continue
        row = runner.run(spec, cell)
        cell_rows[cell].append(row)
        result["rows"].append(row.__dict__)
        result["cells"][cell.label] = cell_summary(cell_rows[cell], floors[cell])
        write_report(path_json, path_md, result)
        ms = "" if row.ms_per_token is None else f"{row.ms_per_token:8.2f} ms/token"
        print(f"{cell.label:<10} {spec.name:<20} {ms} warm-up {row.warmup_s} s compiled {row.compiled} "
              f"{row.status}", flush=True)
    write_report(path_json, path_md, result)
    print(path_md.read_text(), flush=True)
    return result


if __name__ == "__main__":
    main()
