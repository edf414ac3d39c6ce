"""Quest: per-page element-wise min/max of the keys, scored by the upper bound of q.k."""

from torch_memops import ops

from .base import Method, SelectionInputs


class Quest(Method):
    name = "quest"
    summary_mode = "minmax"

    def select(self, inputs: SelectionInputs):
        cfg = inputs.config
        _, indices = ops.topk_relevancy(inputs.query, inputs.summary, inputs.budget_pages, mode="bound",
                                        num_pages=inputs.num_pages, sink_pages=cfg.sink_pages,
                                        recent_pages=cfg.recent_pages, group_reduce=cfg.group_reduce)
        return indices
