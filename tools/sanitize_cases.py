"""CUDA inputs for compute-sanitizer memcheck: the bad values of issue 10 and fuzzed valid ones.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
        python3 tools/sanitize_cases.py [--fuzz 24] [--budget-s 120]

Without the caching allocator every tensor is an allocation of its own, so memcheck reports a
read or write outside any tensor (with caching, a stray access inside a cached block would go
unseen). Bad inputs (checked mode off: the out-of-range rule of docs/design.md applies) run on
both kernel families (tensor cores: bfloat16, D = 64 / 128; portable: float32, or
MEMOPS_CUDA_TENSOR_CORES=0) and must equal the same call with the rule applied by hand. Valid
inputs with random shapes are compared with the CPU backend. Prints one line per case and a
count; exit status 1 on a mismatch (memcheck's own errors give its --error-exitcode).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

import torch_memops
from torch_memops import ops

DEV = "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def i32(*rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEV)


def bad_cases(dtype: torch.dtype, D: int):
    """(name, call with bad values, the same call with the rule applied by hand)."""
    S, P = 20, 8  # N = 3 pages
    N = -(-S // P)
    keys = torch.randn(2, 2, S, D, device=DEV).to(dtype)
    values = torch.randn(2, 2, S, D, device=DEV).to(dtype)
    query = torch.randn(2, 8, D, device=DEV).to(dtype)
    summary = ops.prepare_memory(keys, P)
    gather = lambda idx, lens=None: ops.gather_retrieve(keys, idx, P, seq_lens=lens)  # noqa: E731
    apply = lambda idx, lens=None: ops.sparse_apply(query, keys, values, idx, P,  # noqa: E731
                                                    seq_lens=lens)
    pages_9 = i32([[0, 9, 10**6], [2, 1, 9]], [[10**6, -1, -1], [1, 2, 10**6]])
    pages_9_fixed = i32([[0, -1, -1], [2, 1, -1]], [[-1, -1, -1], [1, 2, -1]])
    pages_big = i32([[0, 10**7, -5], [-5, 1, 2]], [[10**7, 2, -1], [0, -(2**31), 2**31 - 1]])
    pages_big_fixed = i32([[0, -1, -1], [-1, 1, 2]], [[-1, 2, -1], [0, -1, -1]])
    return [
        ("gather_retrieve indices 9, 10^6 of 3 pages",
         lambda: gather(pages_9), lambda: gather(pages_9_fixed)),
        ("gather_retrieve seq_lens 10^6 of 20",
         lambda: gather(pages_9_fixed, i32(10**6, -3)), lambda: gather(pages_9_fixed, i32(S, 0))),
        ("sparse_apply indices 10^7, -5, +-2^31",
         lambda: apply(pages_big), lambda: apply(pages_big_fixed)),
        ("sparse_apply seq_lens 10^6 of 20",
         lambda: apply(pages_big_fixed, i32(10**6, -9)), lambda: apply(pages_big_fixed, i32(S, 0))),
        ("sparse_apply dense seq_lens 10^6 of 20",
         lambda: apply(None, i32(10**6, 5)), lambda: apply(None, i32(S, 5))),
        ("prepare_memory seq_lens 10^6 of 20",
         lambda: ops.prepare_memory(keys, P, seq_lens=i32(10**6, -1)),
         lambda: ops.prepare_memory(keys, P, seq_lens=i32(S, 0))),
        ("prepare_memory_ seq_lens 10^6 of 20",
         lambda: ops.prepare_memory_(summary.clone(), keys, P, 1, seq_lens=i32(10**6, 7)),
         lambda: ops.prepare_memory_(summary.clone(), keys, P, 1, seq_lens=i32(S, 7))),
        ("topk_relevancy num_pages N + 10^6, -7",
         lambda: ops.topk_relevancy(query, summary, 2, num_pages=i32(N + 10**6, -7)),
         lambda: ops.topk_relevancy(query, summary, 2, num_pages=i32(N, 0))),
        ("topk_relevancy num_pages 2^31 - 1, sink/recent",
         lambda: ops.topk_relevancy(query, summary, 3, num_pages=i32(2**31 - 1, 2), sink_pages=1,
                                    recent_pages=1),
         lambda: ops.topk_relevancy(query, summary, 3, num_pages=i32(N, 2), sink_pages=1,
                                    recent_pages=1)),
    ]


def ascending_pages(B, H, k, N, pad_from):
    rows = []
    for _ in range(B * H):
        take = min(k, N, pad_from)
        row = torch.randperm(N)[:take].sort().values
        rows.append(torch.cat([row, torch.full((k - take,), -1)]))
    return torch.stack(rows).view(B, H, k).to(torch.int32)


def fuzz_case(rng: random.Random):
    """A random valid decode step on the CPU and on CUDA; returns the names of mismatches."""
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    D = rng.choice([8, 40, 64, 128, 136])
    Hkv = rng.choice([1, 2, 4])
    Hq = Hkv * rng.choice([1, 3, 4, 8])
    B, P = rng.randint(1, 3), rng.choice([1, 5, 16])
    S = rng.randint(1, 300)
    N = -(-S // P)
    k = rng.randint(1, N + 3)
    spare = rng.randint(0, 9)
    buf = torch.randn(B, Hkv, S + spare, D).to(dtype)
    keys = buf[:, :, :S]
    values = torch.randn(B, Hkv, S, D).to(dtype)
    query = torch.randn(B, Hq, D).to(dtype)
    lens = torch.randint(0, S + 1, (B,), dtype=torch.int32)
    idx = ascending_pages(B, Hkv, k, N, rng.randint(0, k))
    pages = torch.randint(0, N + 1, (B,), dtype=torch.int32)
    cuda = lambda t: t.to(DEV)  # noqa: E731
    keys_c = cuda(buf)[:, :, :S]
    summary = ops.prepare_memory(keys, P, seq_lens=lens)
    summary_c = ops.prepare_memory(keys_c, P, seq_lens=cuda(lens))
    bad = []
    if not torch.equal(summary_c.cpu(), summary):
        bad.append("prepare_memory")
    sink = rng.randint(0, min(k, 2))
    got = ops.topk_relevancy(cuda(query), summary_c, k, num_pages=cuda(pages), sink_pages=sink)
    want = ops.topk_relevancy(query, summary, k, num_pages=pages, sink_pages=sink)
    # Selections may differ on near-ties (float32 sums in another order): compare the padding.
    if not torch.equal(got[1].cpu() < 0, want[1] < 0):
        bad.append("topk_relevancy")
    out, length = ops.gather_retrieve(keys_c, cuda(idx), P, seq_lens=cuda(lens))
    want_out, want_len = ops.gather_retrieve(keys, idx, P, seq_lens=lens)
    if not (torch.equal(out.cpu(), want_out) and torch.equal(length.cpu(), want_len)):
        bad.append("gather_retrieve")
    for name, index in (("sparse_apply", idx), ("sparse_apply dense", None)):
        o, lse = ops.sparse_apply(cuda(query), keys_c, cuda(values),
                                  None if index is None else cuda(index), P, seq_lens=cuda(lens))
        wo, wl = ops.sparse_apply(query.float(), keys.float(), values.float(), index, P,
                                  seq_lens=lens)
        tol = TOL[dtype]
        finite = torch.isfinite(wl)
        if not (torch.allclose(o.cpu().float(), wo, rtol=tol, atol=tol)
                and torch.equal(torch.isfinite(lse.cpu()), finite)
                and torch.allclose(lse.cpu()[finite], wl[finite], rtol=1e-4, atol=1e-4)):
            bad.append(name)
    shape = f"{str(dtype)[6:]} B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} P={P} k={k}"
    return shape, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=24, help="valid random cases")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="stop fuzzing after this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}; caching allocator "
          f"{'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'ON'}",
          flush=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    torch_memops.set_value_checks(False)
    start = time.monotonic()
    failures = total = 0
    for tensor_cores in ("1", "0"):
        os.environ["MEMOPS_CUDA_TENSOR_CORES"] = tensor_cores
        for dtype, D in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)):
            for name, bad, fixed in bad_cases(dtype, D):
                got, want = as_tuple(bad()), as_tuple(fixed())
                torch.cuda.synchronize()
                same = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
                total += 1
                failures += not same
                print(f"bad  tc={tensor_cores} {str(dtype)[6:]:8} D={D:<3} "
                      f"{'ok' if same else 'MISMATCH'}  {name}", flush=True)
    os.environ.pop("MEMOPS_CUDA_TENSOR_CORES")
    fuzzed = 0
    while fuzzed < args.fuzz and time.monotonic() - start < args.budget_s:
        shape, bad = fuzz_case(rng)
        torch.cuda.synchronize()
        fuzzed += 1
        total += 1
        failures += bool(bad)
        print(f"fuzz {'ok' if not bad else 'MISMATCH ' + ', '.join(bad)}  {shape}", flush=True)
    print(f"sanitize_cases: {total - failures}/{total} ok ({fuzzed} fuzzed) in "
          f"{time.monotonic() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
