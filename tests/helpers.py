"""Shared test helpers: the backends to test, random-input builders and comparisons.

Inputs are built on the CPU from the per-test seed (see ``conftest.py``), moved to the device
under test, and results are moved back to the CPU to be compared with ``torch_memops.reference``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

import torch_memops  # noqa: F401  (registers torch.ops.memops.*)
from torch_memops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dtype: torch.dtype) -> str:
    """Test id of a dtype parameter: "float16" rather than "dtype1"."""
    return str(dtype).removeprefix("torch.")


class Backend(NamedTuple):
    """A device torch_memops may have kernels for."""

    device: str
    dispatch_key: str
    available: Callable[[], bool]
    # Host backends read index / length values and reject out-of-range ones; device backends
    # do not (that would need a host sync; see docs/design.md), so value-check tests skip them.
    checks_values: bool


# Every backend beyond the CPU; a new one (e.g. "fpga") is one more entry here.
OPTIONAL_BACKENDS = [
    Backend("cuda", "CUDA", lambda: torch.cuda.is_available(), checks_values=False),
]
CPU = Backend("cpu", "CPU", lambda: True, checks_values=True)


def _has_kernels(backend: Backend) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "memops::sparse_apply", backend.dispatch_key
    )


def backends() -> list[Backend]:
    """The CPU plus every optional backend that is usable here and has kernels registered."""
    return [CPU] + [b for b in OPTIONAL_BACKENDS if b.available() and _has_kernels(b)]


def devices() -> list[str]:
    """Device names of :func:`backends`: the devices every op-vs-reference test runs on."""
    return [b.device for b in backends()]


def value_checking_devices() -> list[str]:
    """Devices whose kernels reject out-of-range seq_lens, num_pages and indices."""
    return [b.device for b in backends() if b.checks_values]


# ------------------------------------------------------------------------------------------------
# Random inputs (built on the CPU, never zeros)
# ------------------------------------------------------------------------------------------------


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape).to(dtype)


def strided_cache(B: int, H: int, S: int, D: int, dtype: torch.dtype, *, spare: int = 5) -> Tensor:
    """A ``[B, H, S, D]`` view ``buf[:, :, :S]`` of a larger preallocated buffer.

    The tokens past ``S`` hold huge values, so that a kernel which reads past the view (or past
    ``seq_lens``) produces visibly wrong results.
    """
    buf = torch.full((B, H, S + spare, D), 3.0e4).to(dtype)
    buf[:, :, :S] = randn(B, H, S, D, dtype=dtype)
    view = buf[:, :, :S]
    return view


def ragged_seq_lens(B: int, S: int) -> Tensor:
    """``int32 [B]`` with an empty row, a full row, and random lengths for the rest."""
    lens = torch.randint(0, S + 1, (B,), dtype=torch.int32)
    lens[0] = 0
    if B > 1:
        lens[-1] = S
    return lens


def ascending_indices(B: int, H: int, k: int, num_pages: int) -> Tensor:
    """``int32 [B, H, k]``: a random ascending page set per row, padded with -1 at the end."""
    out = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            count = int(torch.randint(0, min(k, num_pages) + 1, ()))
            pages = torch.randperm(num_pages)[:count].sort().values
            out[b, h, :count] = pages.to(torch.int32)
    return out


def to_device(device: str, *tensors: Optional[Tensor]):
    """Moves every tensor to ``device`` (keeping strides of views: the buffer moves whole)."""
    moved = []
    for t in tensors:
        if t is None or t.device.type == device:
            moved.append(t)
        elif t.is_contiguous():
            moved.append(t.to(device))
        else:
            base = t._base if t._base is not None else t
            moved.append(base.to(device).as_strided(t.shape, t.stride(), t.storage_offset()))
    return moved if len(moved) > 1 else moved[0]


def cpu(*tensors: Tensor):
    out = [t.cpu() for t in tensors]
    return out if len(out) > 1 else out[0]


@contextlib.contextmanager
def poisoned_outputs():
    """Fills every tensor allocated with ``empty`` inside the block with NaN (or the largest
    integer), so that elements a kernel forgets to write show up in the comparisons."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------

# Tolerances for a result computed in float32 and rounded once to `dtype`: two correct
# implementations differ by float32 summation order (far below these) and can then round to
# neighbouring values, one unit in the last place of `dtype` apart.
ROUNDED_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2.0**-10, atol=2.0**-14),
    torch.bfloat16: dict(rtol=2.0**-7, atol=2.0**-14),
}


def assert_bitwise_equal(actual: Tensor, expected: Tensor) -> None:
    """Bit-exact equality (NaN payloads included): for data movement and untouched buffers."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{actual.dtype}{list(actual.shape)} vs {expected.dtype}{list(expected.shape)}"
    )
    a, e = actual.cpu().contiguous(), expected.cpu().contiguous()
    if a.is_floating_point():
        int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(int_type), e.view(int_type)
    assert torch.equal(a, e), f"{(a != e).sum()} of {a.numel()} elements differ"


def score_tolerance(
    query: Tensor,
    summary: Tensor,
    *,
    mode: str,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """Float32 error bound of the relevancy scores ``[B, Hkv, N]``, for any summation order.

    A float32 sum of ``n`` terms is off by at most ``gamma_n * sum |terms|`` with
    ``gamma_n ~ n * 2**-24``; a score sums ``D`` products per head and up to ``G`` (or ``Hi``)
    head scores. ``sum |terms|`` is bounded by the same score of ``|query|`` and ``|summary|``
    reduced with ``sum`` (the bound for ``max`` too). The factor 2 covers both implementations.
    """
    G = query.shape[1] // summary.shape[1]
    terms = summary.shape[-1] + G + 2
    magnitude = reference.relevancy_scores(
        query.abs(),
        summary.abs(),
        mode=mode,
        group_reduce="sum",
        weights=None if weights is None else weights.abs(),
    )
    bound = 2 * terms * 2.0**-24 * magnitude
    return torch.where(torch.isfinite(bound), bound, torch.zeros_like(bound))


def assert_valid_topk(
    scores: Tensor,
    indices: Tensor,
    ref_scores: Tensor,
    tolerance: Tensor,
    k: int,
    *,
    num_pages: Optional[Tensor] = None,
    sink_pages: int = 0,
    recent_pages: int = 0,
) -> None:
    """Checks that ``(scores, indices)`` is an exact top-k selection under ``ref_scores``.

    ``ref_scores: [B, H, N]`` are the reference scores of every page and ``tolerance`` their
    error bound. The selection must: take every forced (sink / recent) page, list distinct valid
    pages in ascending order padded with ``-1`` (``-inf`` score) to length ``k``, take
    ``min(k, valid pages)`` pages, report each page's score within the tolerance (NaN for NaN),
    and never leave out a page that ranks above a taken one by more than both tolerances (NaN
    ranks as ``-inf``; exactly equal exact scores go to the lower page index).
    """
    scores, indices = scores.cpu(), indices.cpu()
    B, H, N = ref_scores.shape
    assert indices.shape == (B, H, k) and indices.dtype == torch.int32, indices.shape
    assert scores.shape == (B, H, k) and scores.dtype == torch.float32, scores.shape
    nvalid = [N] * B if num_pages is None else num_pages.tolist()
    for b in range(B):
        nv = nvalid[b]
        forced = set(range(min(sink_pages, nv))) | set(range(max(nv - recent_pages, 0), nv))
        for h in range(H):
            where = f"row (b={b}, h={h})"
            row = indices[b, h].tolist()
            taken = [p for p in row if p >= 0]
            count = min(k, nv)
            assert len(taken) == count, f"{where}: {len(taken)} pages taken, expected {count}"
            assert row[count:] == [-1] * (k - count), f"{where}: padding is not at the end: {row}"
            assert taken == sorted(set(taken)), f"{where}: not ascending or duplicated: {row}"
            assert all(0 <= p < nv for p in taken), f"{where}: page outside [0, {nv}): {row}"
            assert forced <= set(taken), f"{where}: forced pages {sorted(forced)} not in {row}"
            pad_scores = scores[b, h, count:]
            assert bool((pad_scores == -math.inf).all()), f"{where}: padding scores {pad_scores}"
            got, want = scores[b, h, :count], ref_scores[b, h, taken].float()
            tol = tolerance[b, h, taken]
            same_nan = torch.isnan(got) == torch.isnan(want)
            close = (got - want).abs() <= tol
            close |= (got == want) | (torch.isnan(got) & torch.isnan(want))
            assert bool(same_nan.all() and close.all()), (
                f"{where}: scores {got.tolist()} differ from the reference {want.tolist()} "
                f"beyond {tol.tolist()}"
            )
            key = torch.nan_to_num(ref_scores[b, h].float(), nan=-math.inf)
            tol_row = tolerance[b, h]
            free_taken = [p for p in taken if p not in forced]
            left_out = [p for p in range(nv) if p not in set(taken)]
            for u in left_out:
                for s in free_taken:
                    above = key[u] - tol_row[u] > key[s] + tol_row[s]
                    exact_tie_lower = (
                        key[u] == key[s] and tol_row[u] == 0 and tol_row[s] == 0 and u < s
                    )
                    assert not (above or exact_tie_lower), (
                        f"{where}: page {u} (score {float(key[u])}) was left out but ranks "
                        f"before the taken page {s} (score {float(key[s])})"
                    )


def reference_attention_fp64(
    query: Tensor, k_cache: Tensor, v_cache: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """Plain softmax attention in float64 through ``scaled_dot_product_attention`` (GQA by
    repeating kv heads): ``[B, Hq, D]``."""
    B, Hq, D = query.shape
    G = Hq // k_cache.shape[1]
    k = k_cache.double().repeat_interleave(G, dim=1)
    v = v_cache.double().repeat_interleave(G, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.double().unsqueeze(2), k, v, scale=scale
    )
    return out.squeeze(2)
