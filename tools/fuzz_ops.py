"""Fuzz the memops operators on one device: random valid cases against the reference, random bad
inputs against the error contract. Prints a table per class and a JSON line; exit status 1 when
any case broke the contract.

    python3 tools/fuzz_ops.py --device cpu --valid 400 --bad 40 --seed 1
    TORCH_MEMOPS_FPGA=emulation python3 tools/fuzz_ops.py --device fpga

Valid cases (random shapes with tails, S < P, k > N, strided caches, ragged seq_lens, odd head dims,
every dtype, NaN/inf in the data) are compared with ``torch_memops.reference`` on the CPU (minmax
and gather bit for bit, the rest within the tests' tolerances) and, on ``fpga``, with the CPU
backend bit for bit. A bad input must raise ``ValueError`` or ``RuntimeError`` whose message starts
with ``memops.`` and names an argument in backticks, and must leave every tensor passed in as it
was. A crash or hang ends this process, which is the point: run it as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import warnings
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import ROUNDED_TOL, assert_valid_topk, score_tolerance  # noqa: E402

from torch_memops import ops, reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FPGA_OPS = ("prepare_memory", "prepare_memory_", "topk_relevancy", "gather_retrieve")
ALL_OPS = FPGA_OPS + ("sparse_apply", "merge_attention")
LSE_TOL = dict(rtol=1e-5, atol=1e-5)


def randn(rng: random.Random, *shape, dtype=torch.float32, specials=False):
    t = torch.randn(*shape)
    if specials and t.numel() and rng.random() < 0.2:
        flat = t.view(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return t.to(dtype)


def strided(rng, B, H, S, D, dtype, specials=False):
    """keys/values [B, H, S, D], sometimes a view of a larger buffer."""
    if rng.random() < 0.5:
        return randn(rng, B, H, S, D, dtype=dtype, specials=specials)
    return randn(rng, B, H, S + rng.randint(1, 9), D, dtype=dtype, specials=specials)[:, :, :S]


def ascending(rng, B, H, k, N):
    idx = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = rng.randint(0, min(k, N))
            idx[b, h, :n] = torch.randperm(N)[:n].sort().values.to(torch.int32)
    return idx


def valid_case(rng: random.Random, op: str, specials: bool):
    """(function name, kwargs) of one valid call, built on the CPU."""
    dtype = rng.choice(DTYPES)
    B, Hkv, G = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 2, 3, 4, 8])
    S, P = rng.randint(0, 90), rng.choice([1, 3, 8, 16, 32])
    D = rng.choice([1, 3, 8, 16, 24, 32, 40, 64, 100, 128])
    N = -(-S // P)
    lens = (torch.tensor([rng.randint(0, S) for _ in range(B)], dtype=torch.int32)
            if rng.random() < 0.5 else None)
    if op in ("prepare_memory", "prepare_memory_"):
        kw = dict(keys=strided(rng, B, Hkv, S, D, dtype, specials), page_size=P,
                  mode=rng.choice(["minmax", "mean"]), seq_lens=lens)
        if op == "prepare_memory_":
            R = 2 if kw["mode"] == "minmax" else 1
            kw["summary"] = torch.full((B, Hkv, N + rng.randint(0, 3), R, D), -777.0).to(dtype)
            kw["first_page"] = rng.randint(0, N + 1)
        return op, kw
    if op == "topk_relevancy":
        mode = rng.choice(["bound", "dot", "indexer"])
        N = max(N, 1)
        k = rng.randint(1, N + 4)
        sink = rng.randint(0, min(2, k))
        recent = rng.randint(0, min(2, k - sink))
        hkv = 1 if mode == "indexer" else Hkv
        D = min(D, 128)
        if mode == "bound":
            summary = reference.prepare_memory(randn(rng, B, hkv, N * 2, D, dtype=dtype), 2)
        else:
            summary = randn(rng, B, hkv, N, 1 if mode == "indexer" else rng.randint(1, 3), D,
                            dtype=dtype, specials=specials)
        kw = dict(query=randn(rng, B, hkv * G, D, dtype=dtype, specials=specials), summary=summary,
                  k=k, mode=mode, sink_pages=sink, recent_pages=recent,
                  group_reduce=rng.choice(["max", "sum"]),
                  num_pages=(torch.tensor([rng.randint(0, N) for _ in range(B)], dtype=torch.int32)
                             if rng.random() < 0.5 else None),
                  weights=torch.rand(B, hkv * G) if mode == "indexer" else None)
        return op, kw
    if op == "gather_retrieve":
        gdtype = rng.choice(DTYPES + [torch.uint8, torch.int32])
        memory = (strided(rng, B, Hkv, S, D, gdtype) if gdtype.is_floating_point
                  else torch.randint(0, 100, (B, Hkv, S, D), dtype=gdtype))
        k = rng.randint(1, max(N, 1) + 3)
        return op, dict(memory=memory, indices=ascending(rng, B, Hkv, k, N), page_size=P,
                        seq_lens=lens)
    if op == "sparse_apply":
        k = rng.randint(1, max(N, 1) + 2)
        per_q = rng.random() < 0.3
        indices = None if rng.random() < 0.3 else ascending(rng, B, Hkv * G if per_q else Hkv, k, N)
        return op, dict(query=randn(rng, B, Hkv * G, D, dtype=dtype),
                        k_cache=strided(rng, B, Hkv, S, D, dtype),
                        v_cache=strided(rng, B, Hkv, S, D, dtype), indices=indices, page_size=P,
                        seq_lens=lens, scale=rng.choice([None, 0.05, 0.3, 1.0]))
    lead = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
    lse = [randn(rng, *lead) * 3 for _ in range(2)]
    for t in lse:
        if rng.random() < 0.3:
            t.view(-1)[0] = rng.choice([-math.inf, math.inf, math.nan])
    return op, dict(out_a=randn(rng, *lead, D, dtype=dtype), lse_a=lse[0],
                    out_b=randn(rng, *lead, D, dtype=dtype), lse_b=lse[1])


def call(op, kw):
    return getattr(ops, op)(**kw)


def to(device, kw):
    return {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}


def tensors_of(result):
    return result if isinstance(result, tuple) else (result,)


def check_valid_cpu(op, kw):
    got = call(op, {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    if op == "prepare_memory_":
        got = None
        summary = kw["summary"].clone()
        ops.prepare_memory_(summary, kw["keys"], kw["page_size"], kw["first_page"],
                            mode=kw["mode"], seq_lens=kw["seq_lens"])
        want = kw["summary"].clone()
        N = -(-kw["keys"].shape[2] // kw["page_size"])
        full = reference.prepare_memory(kw["keys"], kw["page_size"], mode=kw["mode"],
                                        seq_lens=kw["seq_lens"])
        want[:, :, kw["first_page"]:N] = full[:, :, kw["first_page"]:N]
        return equal_or_close(summary, want, exact=kw["mode"] == "minmax")
    if op == "prepare_memory":
        want = reference.prepare_memory(**kw)
        return equal_or_close(got, want, exact=kw["mode"] == "minmax")
    if op == "gather_retrieve":
        want = reference.gather_retrieve(**kw)
        return all(torch.equal(g, w) for g, w in zip(got, want))
    if op == "topk_relevancy":
        scores, indices = got
        ref_scores, ref_indices = reference.topk_relevancy(**kw)
        if torch.equal(indices, ref_indices) and close(scores, ref_scores, rtol=1e-5, atol=1e-5):
            return True  # the same selection, scores but for the summation order (inf included)
        ref = reference.relevancy_scores(kw["query"], kw["summary"], mode=kw["mode"],
                                         group_reduce=kw["group_reduce"], weights=kw["weights"])
        tol = score_tolerance(kw["query"].float(), kw["summary"].float(), mode=kw["mode"],
                              weights=kw["weights"])
        N = kw["summary"].shape[2]
        num_pages = kw["num_pages"]
        try:
            assert_valid_topk(scores, indices, ref, tol, kw["k"], num_pages=num_pages,
                              sink_pages=kw["sink_pages"], recent_pages=kw["recent_pages"])
        except AssertionError:
            return False
        return indices.shape[-1] == kw["k"] and N >= 0
    if op == "sparse_apply":
        # Within the tests' tolerance of the float32 reference, or (large logits: scale * q.k of
        # tens) at most twice as far from a float64 computation as that reference is.
        out, lse = got
        ref_out, ref_lse = reference.sparse_apply(**kw)
        if close(out, ref_out, **ROUNDED_TOL[out.dtype]) and close(lse, ref_lse, **LSE_TOL):
            return True
        f64_out, f64_lse = reference.sparse_apply(**kw, compute_dtype=torch.float64)
        tol = ROUNDED_TOL[out.dtype]
        for ours, ref, exact in ((out.double(), ref_out.double(), f64_out.double()),
                                 (lse.double(), ref_lse.double(), f64_lse.double())):
            finite = torch.isfinite(exact)
            if not torch.equal(finite, torch.isfinite(ours)):
                return False
            err = (ours - exact)[finite].abs()
            ref_err = (ref - exact)[finite].abs()
            if not bool((err <= 2 * ref_err + tol["atol"] + tol["rtol"] * exact[finite].abs()).all()):
                return False
        return True
    out, lse = got
    ref_out, ref_lse = reference.merge_attention(**kw)
    return close(out, ref_out, **ROUNDED_TOL[out.dtype]) and close(lse, ref_lse, **LSE_TOL)


def close(a, b, **tol):
    try:
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
        return True
    except AssertionError:
        return False


def equal_or_close(a, b, exact):
    if exact:
        return close(a, b, rtol=0, atol=0)
    tol = ROUNDED_TOL[a.dtype]
    return close(a.float(), b.float(), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)


def check_valid_fpga(op, kw):
    """The fpga result, bit for bit (NaN included), against the CPU backend's."""
    if op == "prepare_memory_":
        want = kw["summary"].clone()
        ops.prepare_memory_(want, kw["keys"], kw["page_size"], kw["first_page"], mode=kw["mode"],
                            seq_lens=kw["seq_lens"])
        f = to("fpga", kw)
        ops.prepare_memory_(f["summary"], f["keys"], f["page_size"], f["first_page"],
                            mode=f["mode"], seq_lens=f["seq_lens"])
        return close(f["summary"].cpu(), want, rtol=0, atol=0)
    want = tensors_of(call(op, kw))
    got = tensors_of(call(op, to("fpga", kw)))
    return all(g.device.type == "fpga" and close(g.cpu(), w, rtol=0, atol=0)
               for g, w in zip(got, want))


# --- bad inputs ------------------------------------------------------------------------------------

FLOAT_ARGS = {"keys", "summary", "query", "k_cache", "v_cache", "out_a", "out_b", "memory"}
INT_ARGS = {"indices", "seq_lens", "num_pages"}


def mutate(rng, op, kw, cls, device):
    """Turns a valid kwargs dict into a bad one of class `cls`, or None if it does not apply."""
    kw = dict(kw)
    tensors = [n for n, v in kw.items() if isinstance(v, torch.Tensor)]
    if cls == "wrong rank":
        name = rng.choice(tensors)
        t = kw[name]
        kw[name] = t[0] if t.dim() > 1 and rng.random() < 0.5 else t.unsqueeze(0)
    elif cls == "wrong dtype":
        names = [n for n in tensors if n != "memory"]
        if not names:
            return None
        name = rng.choice(names)
        kw[name] = kw[name].to(torch.int64 if name in INT_ARGS else
                               rng.choice([torch.float64, torch.int32]))
    elif cls == "last dim not contiguous":
        names = [n for n in tensors if n in FLOAT_ARGS and kw[n].shape[-1] > 1]
        if not names:
            return None
        name = rng.choice(names)
        kw[name] = torch.stack([kw[name], kw[name]], -1)[..., 0]
    elif cls == "batch mismatch":
        names = [n for n in ("seq_lens", "num_pages", "weights", "indices", "lse_b") if
                 isinstance(kw.get(n), torch.Tensor)]
        if not names:
            return None
        name = rng.choice(names)
        kw[name] = torch.cat([kw[name], kw[name][:1]], 0)
    elif cls == "index out of range":
        if not isinstance(kw.get("indices"), torch.Tensor) or kw["indices"].numel() == 0:
            return None
        idx = kw["indices"].clone()
        idx.view(-1)[rng.randrange(idx.numel())] = rng.choice(
            [-2, -5, -(10**6), 10**6, 2**31 - 1, -(2**31)]) if rng.random() < 0.5 else \
            -(-kw["k_cache" if "k_cache" in kw else "memory"].shape[2] // kw["page_size"])
        kw["indices"] = idx
    elif cls == "seq_lens out of range":
        if "seq_lens" not in kw:
            return None
        S = kw["keys" if "keys" in kw else "memory" if "memory" in kw else "k_cache"].shape[2]
        B = kw["query" if "query" in kw else "keys" if "keys" in kw else "memory"].shape[0]
        lens = torch.full((B,), S, dtype=torch.int32)
        lens[rng.randrange(B)] = rng.choice([S + 1, S + 10**6, -1, -(2**31), 2**31 - 1])
        kw["seq_lens"] = lens
    elif cls == "num_pages out of range":
        if "num_pages" not in kw:
            return None
        B, N = kw["query"].shape[0], kw["summary"].shape[2]
        n = torch.full((B,), N, dtype=torch.int32)
        n[rng.randrange(B)] = rng.choice([N + 1, 10**6, -1, -(2**31)])
        kw["num_pages"] = n
    elif cls == "bad scalar":
        options = [n for n in ("page_size", "k", "first_page", "sink_pages", "mode",
                               "group_reduce") if n in kw]
        if not options:
            return None
        name = rng.choice(options)
        kw[name] = {"page_size": rng.choice([0, -1, 2**31, 2**40, 2**63 - 1]),
                    "k": rng.choice([0, -3, 2**31, 2**40]),
                    "first_page": rng.choice([-1, -(2**40)]),
                    "sink_pages": rng.choice([-1, 10**6]),
                    "mode": "median", "group_reduce": "mean"}[name]
    elif cls == "non-finite or non-positive scale":
        if op != "sparse_apply":
            return None
        kw["scale"] = rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.5])
    elif cls == "requires grad":
        names = [n for n in tensors if kw[n].is_floating_point()]
        if not names:
            return None
        name = rng.choice(names)
        kw[name] = kw[name].clone().requires_grad_()
    elif cls == "device mix":
        if len(tensors) < 2:
            return None
        name = rng.choice(tensors[1:])
        kw[name] = kw[name].to("meta" if device == "cpu" else "cpu")
    return kw


BAD_CLASSES = ["wrong rank", "wrong dtype", "last dim not contiguous", "batch mismatch",
               "index out of range", "seq_lens out of range", "num_pages out of range",
               "bad scalar", "non-finite or non-positive scale", "requires grad", "device mix"]


def snapshot(kw):
    return {n: v.detach().cpu().clone() for n, v in kw.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def unchanged(kw, before):
    for n, saved in before.items():
        now = kw[n].detach().cpu()
        if now.shape != saved.shape or not close(now, saved, rtol=0, atol=0):
            return False
    return True


def run_bad(op, kw):
    """'named': the contract; 'accepted': returned a result; 'unnamed': another error."""
    before = snapshot(kw)
    try:
        call(op, kw)
        outcome = "accepted"
    except (ValueError, RuntimeError) as e:
        text = str(e)
        outcome = "named" if "memops." in text and "`" in text else "unnamed: " + text[:120]
    except Exception as e:  # noqa: BLE001 (any other type breaks the contract)
        outcome = f"unnamed: {type(e).__name__}: {str(e)[:120]}"
    if not unchanged(kw, before):
        outcome += " (an input was modified)"
    return outcome


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "fpga"])
    parser.add_argument("--valid", type=int, default=400, help="valid cases per op")
    parser.add_argument("--bad", type=int, default=40, help="bad cases per class and op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dump", help="directory to torch.save each failing valid case into")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    op_names = FPGA_OPS if args.device == "fpga" else ALL_OPS
    valid = defaultdict(Counter)
    failures = []
    for op in op_names:
        for i in range(args.valid):
            name, kw = valid_case(rng, op, specials=i % 4 == 3)
            ok = check_valid_fpga(name, kw) if args.device == "fpga" else check_valid_cpu(name, kw)
            valid[op]["ok" if ok else "mismatch"] += 1
            if not ok and args.dump:
                os.makedirs(args.dump, exist_ok=True)
                torch.save((name, kw), os.path.join(args.dump, f"{op}_{i}.pt"))
            if not ok:
                failures.append(f"valid {op}: {[(n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, v) for n, v in kw.items()]}")
    bad = defaultdict(Counter)
    for cls in BAD_CLASSES:
        for op in op_names:
            for _ in range(args.bad):
                _, kw = valid_case(rng, op, specials=False)
                kw = to(args.device, kw)
                mutated = mutate(rng, op, kw, cls, args.device)
                if mutated is None:
                    continue
                outcome = run_bad(op, mutated)
                bad[cls]["named" if outcome == "named" else "broken"] += 1
                if outcome != "named":
                    failures.append(f"bad {cls} {op}: {outcome}")
    print(f"device {args.device} (fpga backend: {torch_memops_backend(args.device)}), "
          f"seed {args.seed}")
    print(f"{'valid op':<18}{'cases':>7}{'mismatch':>10}")
    for op in op_names:
        c = valid[op]
        print(f"{op:<18}{sum(c.values()):>7}{c['mismatch']:>10}")
    print(f"{'bad input class':<34}{'cases':>7}{'named error':>13}{'broken':>8}")
    for cls in BAD_CLASSES:
        c = bad[cls]
        print(f"{cls:<34}{sum(c.values()):>7}{c['named']:>13}{c['broken']:>8}")
    for line in failures[:30]:
        print("FAIL", line)
    print(json.dumps({"device": args.device, "seed": args.seed,
                      "valid": {op: dict(valid[op]) for op in op_names},
                      "bad": {cls: dict(bad[cls]) for cls in BAD_CLASSES},
                      "failures": len(failures)}))
    sys.exit(1 if failures else 0)


def torch_memops_backend(device):
    if device != "fpga":
        return "n/a"
    import torch_memops

    return torch_memops.fpga.backend()


if __name__ == "__main__":
    main()
