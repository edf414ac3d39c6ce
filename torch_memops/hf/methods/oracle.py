"""The oracle: the exact top-k pages by the true attention mass of the current query.

Evaluation only: it computes the dense scores of the query against every key (what dense
attention costs) to find the pages that hold the most softmax mass, the best any page selector
can do at a budget. ``oracle`` makes one selection per kv head from its GQA group's per-head
masses reduced by ``config.group_reduce`` (``max``: the largest mass any head of the group puts on
the page; ``sum``: the group's total); ``oracle_head`` selects per query head (``[B, Hq, k]``).
"""

from .base import Method, SelectionInputs
from .by_score import attention_page_mass, group_reduce, select_by_scores


class Oracle(Method):
    name = "oracle"
    summary_mode = None
    compileable = False
    scores_dense_keys = True

    def select(self, inputs: SelectionInputs):
        mass = attention_page_mass(inputs)
        return select_by_scores(group_reduce(mass, inputs.keys.shape[1], inputs.config.group_reduce), inputs)


class OracleHead(Method):
    name = "oracle_head"
    summary_mode = None
    compileable = False
    scores_dense_keys = True
    per_query_head = True

    def select(self, inputs: SelectionInputs):
        return select_by_scores(attention_page_mass(inputs), inputs)
