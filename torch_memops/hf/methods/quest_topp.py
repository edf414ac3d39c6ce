"""Quest with an adaptive budget: the fewest pages whose estimated attention mass reaches ``top_p``.

As Twilight and Double-P do, the budget follows the query: a peaked attention needs few pages, a
flat one many. Each page's attention mass is estimated from a logit ``x`` per page and query head:
``softmax_n(scale * x_n + log t_n)`` over the row's valid pages, ``t_n`` the page's tokens (the
mass of ``t_n`` keys whose logit is ``x_n``). ``quest_topp`` takes Quest's bound ``x = u`` (the
largest ``q.k`` any key of the page can have, from the page's min/max), which overstates the
spread of the mass; ``quest_topp_mid`` takes the midpoint ``x = (u + l) / 2`` of the bound and
the matching lower bound ``l`` (``q`` against the page's min/max box centre), from the same
summary. One selection per kv head: the group's per-head estimates are reduced by
``config.group_reduce`` and renormalised to sum to 1. The pages are ranked sink and recent pages
first (always selected), then by estimated mass (ties to the lower page), and the shortest prefix
of that ranking whose mass reaches ``config.top_p`` is selected, at most ``budget_pages`` pages:
``token_budget`` is a maximum. ``top_p >= 1`` selects every valid page up to the maximum.

The output has the shape of a fixed-budget selection, ``int32 [B, Hkv, budget_pages]``, ascending,
``-1`` padded at the end (the unselected slots are padding); pure tensor code without host
synchronisation or data-dependent shapes, so a static or compiled cache can run it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, SelectionInputs


def estimated_page_mass(inputs: SelectionInputs, estimate: str = "bound") -> Tensor:
    """``float32 [B, Hkv, N]``: each page's estimated attention mass (0 past ``num_pages[b]``), the
    group's per-head estimates reduced by ``config.group_reduce`` and renormalised; ``estimate``:
    ``"bound"`` (Quest's upper bound as the page's logit) or ``"mid"`` (the box centre's)."""
    summary, query = inputs.summary, inputs.query
    batch, kv_heads, pages, _, dim = summary.shape
    group = query.shape[1] // kv_heads
    q = query.float().view(batch, kv_heads, group, dim)
    low, high = summary[:, :, :, 0].float(), summary[:, :, :, 1].float()
    if estimate == "mid":  # (upper + lower bound) / 2 = q . (min + max) / 2
        page_logit = torch.einsum("bkgd,bknd->bkgn", q, (low + high) * 0.5)
    else:  # sum_d max(q_d * min_d, q_d * max_d) = q+ . max + q- . min, since min <= max
        page_logit = (torch.einsum("bkgd,bknd->bkgn", q.clamp(min=0), high)
                      + torch.einsum("bkgd,bknd->bkgn", q.clamp(max=0), low))
    lens = inputs.seq_lens.to(summary.device, torch.long)
    starts = torch.arange(pages, device=summary.device) * inputs.page_size
    tokens = (lens[:, None] - starts[None, :]).clamp(0, inputs.page_size)  # [B, N]
    # pages past a row's length (a static cache's unwritten summary may hold anything) get no mass
    logits = torch.where(tokens[:, None, None, :] > 0, page_logit * inputs.scale + tokens.float().log()[:, None, None, :],
                         float("-inf"))
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    reduced = mass.amax(2) if inputs.config.group_reduce == "max" else mass.sum(2)
    return reduced / reduced.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def top_p_pages(mass: Tensor, num_pages: Tensor, budget: int, top_p: float, sink: int, recent: int) -> Tensor:
    """``int32 [B, H, budget]``: the shortest prefix of the ranking (forced pages, then ``mass``
    descending, ties to the lower page) reaching ``top_p``, at most ``budget`` pages, ascending, -1 padded."""
    batch, heads, pages = mass.shape
    page = torch.arange(pages, device=mass.device)
    valid_pages = num_pages.to(mass.device, torch.long)[:, None]  # [B, 1]
    valid = page[None, :] < valid_pages
    forced = valid & ((page[None, :] < sink) | (page[None, :] >= valid_pages - recent))
    # forced pages rank above any mass (<= 1), invalid pages below any (>= 0)
    key = torch.where(forced[:, None], 2.0, torch.where(valid[:, None], mass, -1.0))
    _, order = key.sort(dim=-1, descending=True, stable=True)
    ranked_mass = torch.where(valid[:, None], mass, 0.0).gather(-1, order)
    # prefix length m: the entries whose cumulative mass before them is below top_p, one more
    before = ranked_mass.cumsum(-1) - ranked_mass
    needed = (before < top_p).sum(-1) if top_p < 1.0 else torch.full_like(order[..., 0], pages)
    n_forced = forced.sum(-1, keepdim=True)  # [B, 1]
    count = torch.minimum(torch.maximum(needed, n_forced), valid_pages).clamp(max=budget)  # [B, H]
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
        return top_p_pages(estimated_page_mass(inputs, self.estimate), inputs.num_pages, inputs.budget_pages, cfg.top_p,
                           cfg.sink_pages, cfg.recent_pages)


class QuestTopPMid(QuestTopP):
    name = "quest_topp_mid"
    estimate = "mid"
