"""Random pages: the sink and recent pages plus a uniformly random set of the others (a floor).

Reproducible: the draw of a decode step depends only on ``seed``, the layer and the row's length,
so reruns and any order of configurations give the same pages. Not compileable (the length is read
on the host).
"""

import torch

from .base import Method, SelectionInputs
from .by_score import page_count, select_by_scores


class RandomPages(Method):
    name = "random"
    summary_mode = None
    compileable = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, inputs: SelectionInputs):
        batch, kv_heads = inputs.keys.shape[:2]
        length = int(inputs.seq_lens.max())
        generator = torch.Generator(device=inputs.keys.device)
        generator.manual_seed((self.seed * 1_000_003 + inputs.layer_idx) * 1_000_003 + length)
        scores = torch.rand(batch, kv_heads, page_count(inputs), generator=generator, device=inputs.keys.device)
        return select_by_scores(scores, inputs)
