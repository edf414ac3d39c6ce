"""Golden vectors for the C-simulation testbenches, computed with ``torch_memops/reference.py``.

Usage: ``python hls/golden.py OUT_DIR`` writes ``OUT_DIR/<kernel>/cases.txt`` (one case name per
line) and ``OUT_DIR/<kernel>/<case>/``: ``params.txt`` (``name value`` lines of integers) and raw
little-endian arrays ``<name>.bin`` (16-bit dtypes as their bits).

The reference sums in another order than the kernels (which sum over ``d`` in order, like the CPU
backend). So that the testbenches can compare every bit, the relevancy and mean inputs are small
multiples of 1/8 or small integers: every product and partial sum is then exact in float32, the
order does not matter, and ties between equal scores go to the lower page index in both.
``minmax`` is exact for any input and uses Gaussian data.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

_REFERENCE = Path(__file__).resolve().parent.parent / "torch_memops" / "reference.py"
_spec = importlib.util.spec_from_file_location("memops_reference", _REFERENCE)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)  # no package import: the extension need not be built

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}
MODES = {"minmax": 0, "mean": 1, "bound": 0, "dot": 1, "indexer": 2}
POISON = -12345.0


def _write_array(path: Path, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    t.numpy().tofile(path)


def _write_case(root: Path, name: str, params: dict[str, int], arrays: dict[str, torch.Tensor]):
    case = root / name
    case.mkdir(parents=True, exist_ok=True)
    (case / "params.txt").write_text("".join(f"{k} {int(v)}\n" for k, v in params.items()))
    for key, value in arrays.items():
        _write_array(case / f"{key}.bin", value)
    return name


def _eighths(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    return (torch.randint(-64, 65, shape, generator=gen).float() / 8).to(dtype)


def _small_ints(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=gen).float().to(dtype)


def prepare_memory_cases(root: Path, gen: torch.Generator) -> list[str]:
    # (dtype, mode, B, H, S, S_buffer, D, P, seq_lens, first_page)
    cases = [
        (torch.float32, "minmax", 3, 3, 37, 48, 32, 8, [37, 0, 21], 0),
        (torch.float16, "mean", 2, 2, 5, 5, 64, 16, None, 0),
        (torch.bfloat16, "minmax", 1, 2, 64, 80, 64, 16, None, 0),
        (torch.bfloat16, "mean", 2, 1, 50, 64, 32, 8, [50, 13], 0),
        (torch.float16, "minmax", 2, 2, 70, 70, 32, 16, [70, 33], 2),
        (torch.float32, "mean", 1, 4, 33, 40, 16, 4, None, 1),
    ]
    names = []
    for i, (dtype, mode, B, H, S, S_buf, D, P, lens, first) in enumerate(cases):
        if mode == "minmax":
            buffer = torch.randn(B, H, S_buf, D, generator=gen).to(dtype)
        else:
            buffer = _eighths(gen, (B, H, S_buf, D), dtype)
        keys = buffer[:, :, :S]
        seq_lens = torch.tensor(lens if lens is not None else [S] * B, dtype=torch.int32)
        N = -(-S // P)
        R = 2 if mode == "minmax" else 1
        summary = torch.full((B, H, N, R, D), POISON).to(dtype)
        expected = summary.clone()
        reference.prepare_memory_(expected, keys, P, first, mode=mode, seq_lens=seq_lens)
        params = dict(batch=B, heads=H, tokens=S, buffer_tokens=S_buf, dim=D, page_size=P,
                      first_page=first, pages=N, reps=R, mode=MODES[mode],
                      dtype=DTYPE_CODES[dtype])
        names.append(_write_case(root, f"case{i}_{str(dtype)[6:]}_{mode}", params,
                                 dict(keys=buffer, seq_lens=seq_lens, summary=summary,
                                      expected=expected)))
    return names


def prepare_memory_int8_cases(root: Path, gen: torch.Generator) -> list[str]:
    """mode 2 (minmax_int8): codes and scales of reference.prepare_memory_int8_, from keys of
    wildly different magnitude per token, with a NaN, an infinite and an all-zero page."""
    # (dtype, B, H, S, S_buffer, D, P, seq_lens, first_page)
    cases = [
        (torch.bfloat16, 2, 2, 70, 80, 128, 16, [70, 0], 0),
        (torch.float32, 1, 3, 37, 48, 64, 8, None, 0),
        (torch.float16, 2, 1, 90, 96, 256, 16, [90, 41], 2),
    ]
    names = []
    for i, (dtype, B, H, S, S_buf, D, P, lens, first) in enumerate(cases):
        magnitude = 2.0 ** torch.randint(-12, 13, (B, H, S_buf, 1), generator=gen).float()
        buffer = (torch.randn(B, H, S_buf, D, generator=gen) * magnitude).to(dtype)
        buffer[0, 0, :P] = 0.0  # page 0: all zero
        buffer[0, -1, P + 3, 5] = math.nan  # page 1 of the last head: NaN
        buffer[-1, 0, 2 * P + 1, 7] = -math.inf  # page 2: an infinity
        keys = buffer[:, :, :S]
        seq_lens = torch.tensor(lens if lens is not None else [S] * B, dtype=torch.int32)
        N = -(-S // P)
        codes = torch.full((B, H, N, 2, D), -99, dtype=torch.int8)
        scales = torch.full((B, H, N), POISON)
        expected, expected_scales = codes.clone(), scales.clone()
        reference.prepare_memory_int8_(expected, expected_scales, keys, P, first,
                                       seq_lens=seq_lens)
        params = dict(batch=B, heads=H, tokens=S, buffer_tokens=S_buf, dim=D, page_size=P,
                      first_page=first, pages=N, reps=2, mode=2, dtype=DTYPE_CODES[dtype])
        names.append(_write_case(root, f"int8_case{i}_{str(dtype)[6:]}", params,
                                 dict(keys=buffer, seq_lens=seq_lens, summary=codes,
                                      expected=expected, expected_scales=expected_scales)))
    return names


def topk_relevancy_int8_cases(root: Path, gen: torch.Generator) -> list[str]:
    """Bound mode on int8 summaries. Summaries of small integers with a -4 in every page quantise
    exactly (scale 2^-4, codes 16 x): every score is an exact integer, in any summation order.
    Plus a NaN page (scale NaN: ranks last) and an infinite page (scale +inf: ranks first)."""
    # (query dtype, B, Hq, Hkv, N, D, k, sink, recent, group_reduce, num_pages)
    cases = [
        (torch.bfloat16, 2, 16, 4, 300, 128, 20, 1, 2, "max", [300, 41]),
        (torch.float32, 1, 4, 2, 60, 64, 9, 0, 0, "sum", None),
        (torch.float16, 2, 14, 2, 37, 256, 40, 2, 1, "max", [37, 0]),
    ]
    names = []
    for i, (dtype, B, Hq, Hkv, N, D, k, sink, recent, reduce, pages) in enumerate(cases):
        query = _small_ints(gen, (B, Hq, D), dtype)
        summary = _small_ints(gen, (B, Hkv, N, 2, D), torch.float32)
        summary = torch.stack([summary.amin(3), summary.amax(3)], dim=3)
        summary[..., 0, 0] = -4.0
        summary[0, 0, 3, :, 1] = math.nan
        summary[-1, -1, 5, 1, 2] = math.inf
        codes, scales = reference.quantize_minmax(summary)
        num_pages = torch.tensor(pages if pages is not None else [N] * B, dtype=torch.int32)
        scores, indices = reference.topk_relevancy(
            query, codes, k, num_pages=num_pages, sink_pages=sink, recent_pages=recent,
            group_reduce=reduce, summary_scales=scales)
        params = dict(batch=B, q_heads=Hq, kv_heads=Hkv, pages=N, reps=2, dim=D, k=k,
                      sink_pages=sink, recent_pages=recent, mode=MODES["bound"],
                      group_reduce=0 if reduce == "max" else 1, dtype=DTYPE_CODES[dtype],
                      summary_dtype=3)
        arrays = dict(query=query, summary=codes, scales=scales, num_pages=num_pages,
                      weights=torch.zeros(B, Hq), expected_scores=scores,
                      expected_indices=indices)
        names.append(_write_case(root, f"int8_case{i}_{str(dtype)[6:]}", params, arrays))
    return names


def topk_relevancy_cases(root: Path, gen: torch.Generator) -> list[str]:
    # (dtype, mode, B, Hq, Hkv, N, R, D, k, sink, recent, group_reduce, num_pages, nan_page)
    cases = [
        (torch.float32, "bound", 3, 8, 2, 37, 2, 16, 8, 1, 2, "max", [37, 5, 0], 4),
        (torch.float16, "dot", 2, 6, 2, 20, 2, 32, 6, 0, 0, "sum", None, None),
        (torch.bfloat16, "dot", 1, 3, 1, 9, 1, 64, 12, 2, 1, "max", None, None),
        (torch.bfloat16, "indexer", 2, 8, 1, 40, 1, 32, 40, 1, 1, "max", [40, 17], 6),
        (torch.float32, "bound", 1, 4, 4, 3000, 2, 16, 2048, 4, 8, "max", None, None),
        (torch.float16, "bound", 2, 16, 2, 50, 2, 32, 7, 0, 3, "sum", [50, 2], None),
    ]
    names = []
    for i, (dtype, mode, B, Hq, Hkv, N, R, D, k, sink, recent, reduce, pages, nan_page) in (
        enumerate(cases)
    ):
        query = _small_ints(gen, (B, Hq, D), dtype)
        summary = _small_ints(gen, (B, Hkv, N, R, D), dtype)
        if mode == "bound":
            summary = torch.stack([summary.amin(3), summary.amax(3)], dim=3)
        if nan_page is not None:
            # NaN in min and max of one element: the score is NaN for every query head (a NaN
            # in only one of them is dropped by the kernels' max, kept by the reference's). In
            # indexer mode the NaN logit must survive relu, as in torch.relu; k = N there, so
            # the NaN page is selected and its score compared.
            summary[0, 0, nan_page, :, 0] = math.nan
        weights = _small_ints(gen, (B, Hq), torch.float32) if mode == "indexer" else None
        num_pages = torch.tensor(pages if pages is not None else [N] * B, dtype=torch.int32)
        scores, indices = reference.topk_relevancy(
            query, summary, k, mode=mode, num_pages=num_pages, sink_pages=sink,
            recent_pages=recent, group_reduce=reduce, weights=weights)
        params = dict(batch=B, q_heads=Hq, kv_heads=Hkv, pages=N, reps=R, dim=D, k=k,
                      sink_pages=sink, recent_pages=recent, mode=MODES[mode],
                      group_reduce=0 if reduce == "max" else 1, dtype=DTYPE_CODES[dtype])
        arrays = dict(query=query, summary=summary, num_pages=num_pages,
                      weights=weights if weights is not None else torch.zeros(B, Hq),
                      expected_scores=scores, expected_indices=indices)
        names.append(_write_case(root, f"case{i}_{str(dtype)[6:]}_{mode}", params, arrays))
    return names


def gather_retrieve_cases(root: Path, gen: torch.Generator) -> list[str]:
    # (dtype, B, H, S, S_buffer, D, P, k, seq_lens)
    cases = [
        (torch.float32, 2, 3, 45, 64, 16, 8, 4, [45, 0]),
        (torch.float16, 1, 2, 10, 10, 64, 16, 3, None),
        (torch.bfloat16, 3, 1, 100, 128, 32, 16, 5, [100, 31, 16]),
        (torch.uint8, 2, 2, 33, 40, 64, 4, 9, [33, 7]),
    ]
    names = []
    for i, (dtype, B, H, S, S_buf, D, P, k, lens) in enumerate(cases):
        if dtype == torch.uint8:
            buffer = torch.randint(0, 256, (B, H, S_buf, D), generator=gen, dtype=torch.uint8)
        else:
            buffer = torch.randn(B, H, S_buf, D, generator=gen).to(dtype)
        memory = buffer[:, :, :S]
        seq_lens = torch.tensor(lens if lens is not None else [S] * B, dtype=torch.int32)
        N = -(-S // P)
        indices = torch.full((B, H, k), -1, dtype=torch.int32)
        for b in range(B):
            for h in range(H):
                count = int(torch.randint(0, min(k, N) + 1, (1,), generator=gen))
                chosen = torch.randperm(N, generator=gen)[:count].sort().values
                indices[b, h, :count] = chosen.to(torch.int32)
        out, lengths = reference.gather_retrieve(memory, indices, P, seq_lens=seq_lens)
        params = dict(batch=B, heads=H, tokens=S, buffer_tokens=S_buf, dim=D,
                      elem_bytes=buffer.element_size(), page_size=P, k=k)
        names.append(_write_case(root, f"case{i}_{str(dtype)[6:]}", params,
                                 dict(memory=buffer, indices=indices, seq_lens=seq_lens,
                                      expected_out=out, expected_lengths=lengths)))
    return names


def main(out_dir: str) -> None:
    root = Path(out_dir)
    gen = torch.Generator().manual_seed(0x4D454D)
    for kernel, builds in (("prepare_memory", (prepare_memory_cases, prepare_memory_int8_cases)),
                           ("topk_relevancy", (topk_relevancy_cases, topk_relevancy_int8_cases)),
                           ("gather_retrieve", (gather_retrieve_cases,))):
        names = [name for build in builds for name in build(root / kernel, gen)]
        (root / kernel / "cases.txt").write_text("".join(n + "\n" for n in names))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hls/golden.py OUT_DIR")
    main(sys.argv[1])
