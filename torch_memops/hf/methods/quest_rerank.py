"""Quest, then an exact rerank of its candidates: a two-stage page selection.

Stage 1 is Quest (the min/max bound, group reduced) with ``candidate_factor`` times the budget;
stage 2 reads the keys of those candidate pages and ranks them by the attention mass the current
query really puts on them among the candidates (softmax over the candidates' tokens per query
head, summed per page, the GQA group reduced by ``config.group_reduce``), keeping the budget's
best. Sink and recent pages are forced in both stages. It reads the summary, the candidates' keys
(``candidate_factor * k * P`` tokens per kv head) and the selected pages' keys and values: more
than Quest at the same budget, far less than dense scoring. Eager only (the candidate keys are a
gather of data-dependent pages; it has no fused kernel).
"""

from __future__ import annotations

import torch

from torch_memops import ops

from .base import Method, SelectionInputs
from .by_score import group_reduce, page_count, select_by_scores, softmax_page_mass


class QuestRerank(Method):
    name = "quest_rerank"
    summary_mode = "minmax"
    compileable = False
    candidate_factor = 4  # stage-1 pages per selected page

    def select(self, inputs: SelectionInputs):
        cfg, page = inputs.config, inputs.page_size
        pages = page_count(inputs)
        k = inputs.budget_pages
        candidates = min(self.candidate_factor * k, pages)
        if candidates <= k:
            # Stage 1 already holds every page: the rerank is the exact selection among all.
            candidates = pages
        _, cand = ops.topk_relevancy(inputs.query, inputs.summary, candidates, mode="bound",
                                     num_pages=inputs.num_pages, sink_pages=cfg.sink_pages,
                                     recent_pages=cfg.recent_pages, group_reduce=cfg.group_reduce)
        keys, _ = ops.gather_retrieve(inputs.keys, cand, page, seq_lens=inputs.seq_lens)  # [B, Hkv, c*P, D]
        batch, kv_heads = cand.shape[:2]
        # Token t of candidate slot j is position cand[j] * P + t; padding (-1) and positions past the
        # row's length carry no mass.
        slot = cand.to(torch.long)
        positions = slot[..., None] * page + torch.arange(page, device=slot.device)
        lens = inputs.seq_lens.to(device=slot.device, dtype=torch.long)[:, None, None, None]
        valid = ((slot[..., None] >= 0) & (positions < lens)).view(batch, kv_heads, 1, -1)
        mass = softmax_page_mass(inputs.query, keys, valid, inputs.scale, page)  # [B, Hq, c]
        mass = group_reduce(mass, kv_heads, cfg.group_reduce)  # [B, Hkv, c]
        # Back to page numbers: non-candidates score -1 (below any mass), then the budget's top.
        scores = mass.new_full((batch, kv_heads, pages + 1), -1.0)
        scores.scatter_(2, torch.where(slot >= 0, slot, pages), torch.where(slot >= 0, mass, -1.0))
        return select_by_scores(scores[:, :, :pages], inputs)
