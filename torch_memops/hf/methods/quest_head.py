"""Quest with one selection per query head (``[B, Hq, k]``), as Quest selects on MHA models.

The kv head's min/max summary is scored by each query head's own bound and each head keeps its own
top-k pages; ``sparse_apply`` takes per-query-head indices, so a GQA group reads up to ``G`` times
the pages of a shared selection.
"""

from torch_memops import ops

from .base import Method, SelectionInputs
from .by_score import per_query_head_summary


class QuestHead(Method):
    name = "quest_head"
    summary_mode = "minmax"
    per_query_head = True
    score_mode = "bound"

    def select(self, inputs: SelectionInputs):
        cfg = inputs.config
        summary = per_query_head_summary(inputs.summary, inputs.query.shape[1])
        _, indices = ops.topk_relevancy(inputs.query, summary, inputs.budget_pages, mode=self.score_mode,
                                        num_pages=inputs.num_pages, sink_pages=cfg.sink_pages,
                                        recent_pages=cfg.recent_pages)
        return indices
