"""StreamingLLM (Xiao et al. 2023): attention sinks plus the most recent pages, no relevancy.

The budget goes to the ``config.sink_pages`` first pages and the newest pages of each row; no
summary is kept or scored.
"""

import torch

from .base import Method, SelectionInputs
from .by_score import page_count, select_by_scores


class Streaming(Method):
    name = "streaming"
    summary_mode = None

    def select(self, inputs: SelectionInputs):
        batch, kv_heads = inputs.keys.shape[:2]
        pages = page_count(inputs)
        newest_first = torch.arange(pages, device=inputs.keys.device, dtype=torch.float32)
        return select_by_scores(newest_first.expand(batch, kv_heads, pages), inputs)
