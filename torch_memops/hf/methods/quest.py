"""Quest: per-page element-wise min/max of the keys, scored by the upper bound of q.k."""

from .base import TopkMethod


class Quest(TopkMethod):
    name = "quest"
    summary_mode = "minmax"
    score_mode = "bound"
