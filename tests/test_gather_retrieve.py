"""gather_retrieve against the reference: bit-exact data movement."""

import pytest
import torch
from helpers import (
    DTYPES,
    ascending_indices,
    assert_bitwise_equal,
    cpu,
    devices,
    dtype_id,
    poisoned_outputs,
    ragged_seq_lens,
    strided_cache,
    to_device,
)

from torch_memops import ops, reference

# (B, H, S, D, P, k): tails, S < P, k > N, k == N.
SHAPES = [(2, 3, 37, 16, 8, 3), (3, 2, 5, 8, 16, 2), (2, 2, 40, 8, 8, 5), (1, 4, 23, 4, 4, 9)]


def gather(device, memory, indices, page_size, seq_lens=None):
    with poisoned_outputs():
        out, lengths = ops.gather_retrieve(*to_device(device, memory, indices), page_size,
                                           seq_lens=to_device(device, seq_lens))
    return cpu(out, lengths)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.uint8], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_gather_matches_reference(device, dtype, shape, ragged):
    B, H, S, D, P, k = shape
    memory = strided_cache(B, H, S, D, torch.float32)
    memory = memory.to(dtype) if dtype.is_floating_point else (memory * 10).to(dtype)
    indices = ascending_indices(B, H, k, -(-S // P))
    seq_lens = ragged_seq_lens(B, S) if ragged else None
    out, lengths = gather(device, memory, indices, P, seq_lens)
    ref_out, ref_lengths = reference.gather_retrieve(memory, indices, P, seq_lens=seq_lens)
    assert_bitwise_equal(out, ref_out)
    assert torch.equal(lengths, ref_lengths)


@pytest.mark.parametrize("device", devices())
def test_gather_any_index_order_and_duplicates(device):
    # Slot j always lands at rows j*P.., whatever the order: unsorted, repeated, -1 in between.
    memory = strided_cache(2, 2, 30, 8, torch.float16)
    indices = torch.randint(-1, 4, (2, 2, 6), dtype=torch.int32)
    out, lengths = gather(device, memory, indices, 8)
    ref_out, ref_lengths = reference.gather_retrieve(memory, indices, 8)
    assert_bitwise_equal(out, ref_out)
    assert torch.equal(lengths, ref_lengths)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gathered_topk_selection_is_a_prefix(device, dtype):
    # With topk_relevancy's indices (ascending, padded at the end) the valid tokens are the
    # first lengths[b, h] rows of out, in cache order, and the rest is zero.
    B, H, S, D, P, k = 3, 2, 45, 8, 8, 4
    keys = strided_cache(B, H, S, D, dtype)
    seq_lens = torch.tensor([0, 19, 45], dtype=torch.int32)
    summary = ops.prepare_memory(keys, P, seq_lens=seq_lens)
    num_pages = ((seq_lens + P - 1) // P).to(torch.int32)
    _, indices = ops.topk_relevancy(torch.randn(B, 2 * H, D).to(dtype), summary, k,
                                    num_pages=num_pages)
    out, lengths = gather(device, keys, indices, P, seq_lens)
    for b in range(B):
        for h in range(H):
            tokens = [t for p in indices[b, h].tolist() if p >= 0
                      for t in range(p * P, min((p + 1) * P, int(seq_lens[b])))]
            n = int(lengths[b, h])
            assert n == len(tokens)
            assert_bitwise_equal(out[b, h, :n], keys[b, h, tokens])
            assert not out[b, h, n:].any()
