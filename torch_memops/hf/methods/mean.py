"""Mean-pooled page keys scored by a dot product (InfLLM / SeerAttention-style selectors)."""

from .base import TopkMethod


class MeanKeys(TopkMethod):
    name = "mean"
    summary_mode = "mean"
    score_mode = "dot"
