"""Quest with an adaptive budget: the fewest pages whose estimated attention mass reaches ``top_p``.

As Twilight and Double-P do, the budget follows the query: a peaked attention needs few pages, a
flat one many. The pages are ranked as ``quest`` ranks them, by Quest's score ``u`` of the GQA
group (each query head's upper bound of ``q.k`` over the page's min/max, reduced over the group by
``config.group_reduce``: ``max``, or the mean for ``sum``, which ranks the same); each page's
attention mass is estimated as ``softmax_n(scale * u_n + log t_n)`` over the row's valid pages,
``t_n`` the page's tokens (the mass of ``t_n`` keys whose logit is ``u_n``). The sink and recent
pages come first (always selected), then the others by that score (ties to the lower page), and
the shortest prefix of the ranking whose estimated mass reaches ``config.top_p`` is selected, at
most ``budget_pages`` pages: ``token_budget`` is a maximum, and at ``top_p = 1`` (or whenever the
maximum binds) the selection is ``quest``'s. ``quest_topp_mid`` scores each page at the centre of
its min/max box, ``q . (min + max) / 2`` (the mean of Quest's upper and lower bounds), which
overstates the spread of the mass less than the bound does but ranks the pages differently.

The output has the shape of a fixed-budget selection, ``int32 [B, Hkv, budget_pages]``, ascending,
``-1`` padded at the end (the unselected slots are padding); pure tensor code without host
synchronisation or data-dependent shapes, so a static or compiled cache can run it.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import Method, SelectionInputs


def page_scores(inputs: SelectionInputs, estimate: str = "bound") -> Tuple[Tensor, Tensor]:
    """``(logits, mass)``, both ``float32 [B, Hkv, N]``: each page's estimated attention logit
    ``scale * u + log t`` (``-inf`` past ``num_pages[b]``) and its softmax over the pages, the
    estimated mass; ``estimate``: ``"bound"`` (Quest's upper bound as ``u``) or ``"mid"`` (the
    min/max box centre's ``q.k``)."""
    summary, query = inputs.summary, inputs.query
    batch, kv_heads, pages, _, dim = summary.shape
    group = query.shape[1] // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    low, high = summary[:, :, :, 0].float(), summary[:, :, :, 1].float()
    if estimate == "mid":  # (upper + lower bound) / 2 = q . (min + max) / 2
        per_head = torch.einsum("bkgd,bknd->bkgn", q, (low + high) * 0.5)
    else:  # sum_d max(q_d * min_d, q_d * max_d) = q+ . max + q- . min, since min <= max
        per_head = (torch.einsum("bkgd,bknd->bkgn", q.clamp(min=0), high)
                    + torch.einsum("bkgd,bknd->bkgn", q.clamp(max=0), low))
    score = per_head.amax(2) if inputs.config.group_reduce == "max" else per_head.mean(2)
    lens = inputs.seq_lens.to(summary.device, torch.long)
    starts = torch.arange(pages, device=summary.device) * inputs.page_size
    tokens = (lens[:, None] - starts[None, :]).clamp(0, inputs.page_size)[:, None]  # [B, 1, N]
    # pages past a row's length (a static cache's unwritten summary may hold anything) get no mass
    logits = torch.where(tokens > 0, score * inputs.scale + tokens.float().log(), float("-inf"))
    return logits, torch.softmax(logits, dim=-1).nan_to_num(0.0)


def top_p_pages(logits: Tensor, mass: Tensor, num_pages: Tensor, budget: int, top_p: float, sink: int,
                recent: int) -> Tensor:
    """``int32 [B, H, budget]``: the shortest prefix of the ranking (forced pages, then ``logits``
    descending, ties to the lower page) whose ``mass`` reaches ``top_p``, at most ``budget`` pages,
    ascending, -1 padded."""
    pages = mass.shape[-1]
    page = torch.arange(pages, device=mass.device)
    valid_pages = num_pages.to(mass.device, torch.long)[:, None]  # [B, 1]
    valid = (page[None, :] < valid_pages)[:, None]  # [B, 1, N]
    forced = valid & ((page < sink) | (page[None, :] >= valid_pages - recent))[:, None]
    key = torch.where(forced, float("inf"), torch.where(valid, logits, float("-inf")))
    _, order = key.sort(dim=-1, descending=True, stable=True)
    ranked_mass = torch.where(valid, mass, 0.0).gather(-1, order)
    # prefix length: the entries whose cumulative mass before them is below top_p
    before = ranked_mass.cumsum(-1) - ranked_mass
    needed = (before < top_p).sum(-1) if top_p < 1.0 else torch.full_like(order[..., 0], pages)
    count = torch.minimum(torch.maximum(needed, forced.sum(-1)), valid_pages).clamp(max=budget)  # [B, H]
    width = min(budget, pages)
    chosen = order[..., :width]
    chosen = torch.where(torch.arange(width, device=mass.device) < count[..., None], chosen, pages)
    chosen = chosen.sort(dim=-1).values
    chosen = torch.where(chosen == pages, -1, chosen).to(torch.int32)
    if width < budget:
        chosen = torch.nn.functional.pad(chosen, (0, budget - width), value=-1)
    return chosen


class QuestTopP(Method):
    name = "quest_topp"
    summary_mode = "minmax"
    adaptive_budget = True
    estimate = "bound"

    def select(self, inputs: SelectionInputs):
        cfg = inputs.config
        logits, mass = page_scores(inputs, self.estimate)
        return top_p_pages(logits, mass, inputs.num_pages, inputs.budget_pages, cfg.top_p, cfg.sink_pages,
                           cfg.recent_pages)


class QuestTopPMid(QuestTopP):
    name = "quest_topp_mid"
    estimate = "mid"
