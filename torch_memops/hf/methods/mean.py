"""Mean-pooled page keys scored by a dot product (InfLLM / SeerAttention-style selectors)."""

from torch_memops import ops

from .base import Method, SelectionInputs


class MeanKeys(Method):
    name = "mean"
    summary_mode = "mean"

    def select(self, inputs: SelectionInputs):
        cfg = inputs.config
        _, indices = ops.topk_relevancy(inputs.query, inputs.summary, inputs.budget_pages, mode="dot",
                                        num_pages=inputs.num_pages, sink_pages=cfg.sink_pages,
                                        recent_pages=cfg.recent_pages, group_reduce=cfg.group_reduce)
        return indices
