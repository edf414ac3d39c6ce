"""Mean-pooled page keys with one selection per query head (``[B, Hq, k]``)."""

from .quest_head import QuestHead


class MeanHead(QuestHead):
    name = "mean_head"
    summary_mode = "mean"
    score_mode = "dot"
