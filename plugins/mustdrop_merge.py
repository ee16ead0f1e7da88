"""MustDrop's encoder stage: merge the most self-similar k x k windows of the patch grid.

The official ``conditional_pooling`` (liuting20/MustDrop, ``local_merge.py``) scores every
non-overlapping ``k x k`` window by the mean cosine similarity of its token pairs and
averages each chosen window into its last (bottom-right) token. Here the number of
merges follows the budget, in rounds planned on the host:

* a round removes up to ``cells - windows`` tokens; the windows are taken by decreasing
  similarity, the last one only partly (its tokens most similar to its bottom-right
  token first) so that exactly the budget remains;
* if the budget is below the number of windows, every window is merged and the next
  round runs on the grid of windows (``ceil(h/k) x ceil(w/k)``), on the merged features.
"""

from __future__ import annotations

import math

import torch

from tokenreduce import ops


def plan_rounds(n: int, t: int, h: int, w: int, k: int) -> list[tuple[int, int, int]]:
    """``(h, w, removals)`` of each round taking one row from ``n = h*w`` to ``t`` tokens (at least one round)."""
    rounds, left = [(h, w, 0)], n - t
    while left > 0:
        if rounds[-1][2] > 0:  # the previous round merged every window: continue on their grid
            h, w = math.ceil(h / k), math.ceil(w / k)
            rounds.append((h, w, 0))
        take = min(left, h * w - math.ceil(h / k) * math.ceil(w / k))
        rounds[-1] = (h, w, take)
        left -= take
    return rounds


def window_merge(
    tokens: torch.Tensor, valid: torch.Tensor, plans: list[list[tuple[int, int, int]]], k: int, *, dense: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the valid tokens of each row by rounds of window merging.

    Args:
        tokens: ``(B, N, D)`` features.
        valid: ``(B, N)``; a row's valid tokens, in order, fill its ``h x w`` grid.
        plans: per row, its :func:`plan_rounds` (host integers).
        k: window side.
        dense: every token is valid (known on the host): round one's groups are then the
            tokens themselves, whose means need no grouping pass.

    Returns:
        ``(owner (B, N), rep (B, G))``: each token's group (-1 for padding) and each group's
        representative (its surviving bottom-right token; groups without members are unused).
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    x = tokens.float()
    depth = max(len(p) for p in plans)
    owner = torch.where(valid, valid.long().cumsum(dim=1) - 1, torch.full((b, n), -1, device=dev))
    pos = torch.arange(n, device=dev).expand(b, n)
    rep = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    rep = rep.scatter(1, torch.where(valid, owner, n), pos)[:, :n]
    for i in range(depth):  # a handful of host-planned rounds, each batched over rows
        # Rows past their last round repeat its grid with nothing to remove.
        row = [p[i] if i < len(p) else (*p[-1][:2], 0) for p in plans]
        go_on = [i + 1 < len(p) for p in plans]
        owner, rep = _round(x, owner, rep, row, go_on, k, identity=dense and i == 0)
    return owner, rep


def _per_row(values: list, device: torch.device) -> int | bool | torch.Tensor:
    """A per-row host value as a plain scalar when every row shares it (no host-to-device
    copy, which would wait for the device), else a ``(B, 1)`` tensor (padded batches)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=device)[:, None]


def _round(x, owner, rep, row, go_on, k, identity=False):
    """One round: merge ``row[b][2]`` tokens of each row on its ``row[b][:2]`` grid.

    ``identity``: every token is its own group (``owner`` is ``arange(N)``, ``G = N``)."""
    b, n, _ = x.shape
    dev = x.device
    h, w, take = (_per_row([r[i] for r in row], dev) for i in range(3))
    g = max(r[0] * r[1] for r in row)
    n_win = max(math.ceil(r[0] / k) * math.ceil(r[1] / k) for r in row)
    # Cells of a window, in raster order; a window is cut by the grid edge, so no window
    # needs more rows or columns than the largest grid (a window wider than the grid).
    kh, kw = min(k, max(r[0] for r in row)), min(k, max(r[1] for r in row))
    kk = kh * kw

    # Group features: the mean of their members (a single token's own feature in round one).
    if identity and g == n:
        # The same values as the grouping pass gives (sums onto zeros: -0.0 becomes +0.0), without
        # its (B, N, N) one-hot product on CUDA: the largest product of a call at B = 8.
        feats, size = x + 0.0, torch.ones(b, g, device=dev)
    else:
        sums, size = ops.merge_into(x, owner, g)
        feats = sums / size.clamp(min=1).unsqueeze(-1)
    cell = torch.arange(g, device=dev).expand(b, g)
    r_, c_ = cell // w, cell % w
    wid = (r_ // k) * ((w + k - 1) // k) + c_ // k
    slot = (r_ % k) * kw + c_ % k
    present = (cell < h * w) & (size > 0)

    # (B, W, k*k) table of the groups in each window; a spare entry absorbs absent cells.
    flat = torch.where(present, wid * kk + slot, n_win * kk)
    table = torch.full((b, n_win * kk + 1), -1, dtype=torch.long, device=dev)
    table = table.scatter(1, flat, cell)[:, :-1].view(b, n_win, kk)
    here = table >= 0
    f = ops.normalize(ops.gather_rows(feats, table.view(b, -1)).view(b, n_win, kk, -1))
    sims = f @ f.transpose(-1, -2)  # (B, W, k*k, k*k)
    eye = torch.eye(kk, dtype=torch.bool, device=dev)
    pair = here.unsqueeze(-1) & here.unsqueeze(-2) & ~eye
    m = here.sum(dim=-1)
    # Mean similarity over ordered pairs, self-pairs excluded (official: / (k^2 (k^2 - 1))).
    wsim = (sims * pair).sum(-1).sum(-1) / (m * (m - 1)).clamp(min=1)
    cap = (m - 1).clamp(min=0)
    wsim = wsim.masked_fill(cap == 0, float("-inf"))

    # Windows by decreasing similarity take their share of this round's removals.
    order = torch.sort(wsim, dim=1, descending=True, stable=True).indices
    cap_sorted = cap.gather(1, order)
    before = cap_sorted.cumsum(dim=1) - cap_sorted
    quota = torch.zeros_like(cap).scatter(1, order, (take - before).clamp(min=0).minimum(cap_sorted))

    # Destination: the window's last present cell (bottom-right for a full window).
    slots = torch.arange(kk, device=dev)
    dst_slot = torch.where(here, slots, -1).amax(dim=-1, keepdim=True)  # (B, W, 1)
    dst = table.gather(2, dst_slot.clamp(min=0))
    # Sources by decreasing similarity to the destination (all of them for a full window).
    to_dst = sims.gather(2, dst_slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, 1, kk)).squeeze(2)
    src = here & (slots != dst_slot)
    src_order = torch.sort(to_dst.masked_fill(~src, float("-inf")), dim=-1, descending=True, stable=True).indices
    src_rank = torch.empty_like(src_order).scatter_(-1, src_order, slots.expand_as(src_order))
    merge = src & (src_rank < quota.unsqueeze(-1))
    target = torch.where(merge, dst.expand_as(table), table)

    # Per group: where it goes (its window's destination, or itself); absent cells write
    # to a spare column.
    into = torch.arange(g + 1, device=dev).repeat(b, 1)
    into = into.scatter(1, torch.where(here, table, g).view(b, -1), target.view(b, -1))[:, :g]
    merged = torch.where(owner >= 0, into.gather(1, owner.clamp(min=0)), owner)
    if not any(go_on):
        return merged, rep

    # Rows going on to another round have merged every window: the window ids become the
    # cells of the next grid, each represented by its destination's representative.
    more = _per_row(go_on, dev)
    nxt = torch.where(owner >= 0, torch.where(present, wid, 0).gather(1, owner.clamp(min=0)), owner)
    width = max(rep.shape[1], n_win)
    pad = lambda t: torch.cat([t, t.new_full((b, width - t.shape[1]), -1)], dim=1)  # noqa: E731
    next_rep = rep.gather(1, dst.view(b, n_win).clamp(min=0))
    if more is True:
        return nxt, pad(next_rep)
    return torch.where(more, nxt, merged), torch.where(more, pad(next_rep), pad(rep))
