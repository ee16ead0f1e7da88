"""FastVID's building blocks, batched over videos: frame blocks, DySeg, the budget split, DPC density, DTM merging.

Every function works on a whole batch of videos at once, with the data-dependent parts
(segment boundaries, which frames hold anchors, how many tokens each frame keeps) as
padded masks and per-frame counts on the device, never as host-side lists.
"""

from __future__ import annotations

import math

import torch

from tokenreduce import ops

from .prunevid_cluster import constant, gram_distances, positions
from .ranking import stable_rank

#: The official density uses the 4 nearest neighbours of a token (itself included).
KNN = 4


def rank_desc(values: torch.Tensor, usable: torch.Tensor | None) -> torch.Tensor:
    """Rank of each entry along the last dim, highest first (ties: lower index); unusable entries last
    (``None``: all usable)."""
    key = values if usable is None else values.masked_fill(~usable, float("-inf"))
    return stable_rank(key, descending=True)


def frame_blocks(
    valid: torch.Tensor, frame_index: torch.Tensor, frames: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes in a ``(B, F, L)`` layout, one block per frame.

    Row ``b``'s valid tokens of frame ``f``, in position order, fill block ``f`` from slot 0;
    ``length`` must bound every frame's valid count. Returns ``(pos, ok)``: ``pos`` the
    token position of each slot (``N`` at unused slots) and ``ok`` the used slots.
    """
    b, n = valid.shape
    dev = valid.device
    onehot = (frame_index.unsqueeze(-1) == torch.arange(frames, device=dev)) & valid.unsqueeze(-1)
    rank = onehot.long().cumsum(dim=1).gather(2, frame_index.unsqueeze(-1)).squeeze(-1) - 1
    flat = torch.where(valid, frame_index * length + rank, frames * length)  # padding: spare slot
    pos = torch.full((b, frames * length + 1), n, dtype=torch.long, device=dev)
    pos.scatter_(1, flat, torch.arange(n, device=dev).expand(b, n))
    pos = pos[:, :-1].view(b, frames, length)
    return pos, pos < n


def segments(
    means: torch.Tensor, present: torch.Tensor | None, min_segments: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DySeg: ``(segment id (B, F), adjacent-frame similarity (B, F-1))``.

    The video is cut after frame ``t`` where ``cos(g_t, g_{t+1})`` is among the
    ``min_segments - 1`` smallest (ties: earlier frame first) or below ``tau``. A pair with an
    empty frame (``present`` False) has similarity 1: nothing shows a change there (``present``
    None: no frame is empty).
    """
    b, f, _ = means.shape
    if f == 1:
        return torch.zeros(b, 1, dtype=torch.long, device=means.device), means.new_zeros(b, 0)
    g = ops.normalize(means)
    sim = (g[:, :-1] * g[:, 1:]).sum(dim=-1)
    if present is not None:
        sim = sim.masked_fill(~(present[:, :-1] & present[:, 1:]), 1.0)
    k = min(min_segments - 1, f - 1)  # host-known: the official topk(c - 1) needs F >= c
    cut = (rank_desc(-sim, None) < k) | (sim < tau)
    return torch.nn.functional.pad(cut.cumsum(dim=1), (1, 0)), sim


def segment_layout(seg: torch.Tensor, interval: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame: ``(segment length, anchor frame?, anchor frames in its segment)``, each ``(B, F)``.

    Anchor frames are every ``interval``-th frame counted back from the segment's last frame
    (the last frame always is one), as the official ``seg_indices % p == 0``.
    """
    f = seg.shape[1]
    same = seg.unsqueeze(2) == seg.unsqueeze(1)  # (B, F, F)
    later = constant("later", f, seg.device, lambda: positions(f, seg.device).view(f, 1) < positions(f, seg.device))
    length = same.sum(dim=2)
    anchor = (same & later).sum(dim=2) % interval == 0
    groups = (length + interval - 1) // interval
    return length, anchor, groups


def split_budget(
    counts: torch.Tensor,
    present: torch.Tensor | int,
    length: torch.Tensor,
    anchor: torch.Tensor,
    groups: torch.Tensor,
    max_retain: int,
    context_ratio: float,
) -> dict[str, torch.Tensor]:
    """The per-frame retention ``R`` of each video and what each frame keeps at that ``R``.

    For every ``R`` in ``0..max_retain`` (host-known) the official counts are tabled on the
    device: ``S = R - int(R d)`` salient tokens per frame, ``C = int(R d)``, and on each
    anchor frame ``cur = C * len // ceil(len / p)`` anchors, capped by what the frame holds.
    The video keeps ``K(R)`` tokens in all (non-decreasing in ``R``); ``R`` is the smallest
    retention reaching the largest ``K(R) <= budget``, and the ``budget - K(R)`` tokens
    left over are topped up by the caller.
    """
    dev = counts.device
    table = positions(max_retain + 1, dev)
    # In float64, as the official int(frame_retain_num * d) on Python floats: the same
    # products, the same floors (and no host-built table to copy over).
    ctx_tab = torch.floor(table.double() * context_ratio).long()
    sal_tab = table - ctx_tab
    cur = ctx_tab * length.unsqueeze(-1) // groups.unsqueeze(-1) * anchor.unsqueeze(-1)  # 0 off anchor frames
    if isinstance(present, int):  # every frame holds this many tokens
        salient = sal_tab.clamp(max=present).expand_as(cur)
        anchors = torch.minimum(cur, present - salient)
    else:
        size = present.unsqueeze(-1)  # (B, F, 1) tokens per frame
        salient = torch.minimum(sal_tab, size)
        anchors = torch.minimum(cur, size - salient)
    kept = (salient + anchors).sum(dim=1)  # (B, R + 1)
    best = kept.masked_fill(kept > counts.unsqueeze(1), -1).amax(dim=1)
    r = (kept < best.unsqueeze(1)).sum(dim=1)  # K is non-decreasing: the first R reaching it
    pick = lambda t: t.gather(2, r.view(-1, 1, 1).expand(t.shape[0], t.shape[1], 1)).squeeze(-1)  # noqa: E731
    context = ctx_tab[r]
    cur_r = pick(cur)
    return {
        "retain": r,
        "salient": pick(salient),
        "anchors": pick(anchors),
        # Segments whose anchor frames hold more than C anchors merge over the whole
        # segment (the official multi-frame DTM); the others within their frame.
        "multi": anchor & (cur_r > context.unsqueeze(1)),
        "topup": counts - best,
    }


def density_scores(x: torch.Tensor, pool: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """DPC-kNN score ``delta * rho`` of each pool token within its frame block.

    ``x (B, F, L, D)``, ``pool (B, F, L)``. With ``d = ||x_i - x_j|| / sqrt(D)`` between
    pool tokens of a frame: ``rho = exp(-mean of the squared 4 nearest d)`` (itself
    included, fewer when the pool is smaller); ``delta`` = distance to the nearest token of
    higher density (equal density: the lower index counts as higher, in place of the
    official 1e-6 random noise), or the frame's largest ``d`` for the densest token.
    ``gram (B, F, L, L)``: each frame's Gram matrix, for the distances in their CUDA form
    (:func:`tokenreduce.ops.cuda_formulas`; computed in full float32 by the caller).
    """
    b, f, length, d = x.shape
    if gram is None:
        flat = x.reshape(b * f, length, d)
        # Exact pairwise differences, not the |x|^2 + |y|^2 - 2xy matmul form: duplicates get
        # exactly 0, and the result does not depend on the block length (batch = rows alone).
        dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    else:
        dist = gram_distances(gram.reshape(b * f, length, length)) / math.sqrt(d)
    ok = pool.reshape(b * f, length)
    apart = ~(ok.unsqueeze(2) & ok.unsqueeze(1))
    near = dist.masked_fill(apart, float("inf")).topk(min(KNN, length), dim=-1, largest=False).values
    real = torch.isfinite(near)
    mean_sq = (near.square().masked_fill(~real, 0)).sum(-1) / real.sum(-1).clamp(min=1)
    rho = torch.exp(-mean_sq)
    # higher[i, j]: token j is denser than token i (the lower index on equal densities).
    idx = positions(length, x.device)
    lower = constant("lower", length, x.device, lambda: idx.view(1, -1) < idx.view(-1, 1))
    rj, ri = rho.unsqueeze(1), rho.unsqueeze(2)
    higher = torch.where(lower, rj >= ri, rj > ri).masked_fill(apart, False)
    dmax = dist.masked_fill(apart, 0).amax(dim=(1, 2))
    delta = dist.masked_fill(~higher, float("inf")).amin(dim=-1)
    delta = torch.where(torch.isinf(delta), dmax.unsqueeze(1), delta)
    return (delta * rho).masked_fill(~ok, 0).view(b, f, length)


def merge_into_anchors(
    x: torch.Tensor,
    indices: torch.Tensor,
    is_anchor: torch.Tensor,
    pool: torch.Tensor,
    frame: torch.Tensor,
    seg_of_token: torch.Tensor,
    multi_of_token: torch.Tensor,
    dropped: torch.Tensor,
    frames: int,
    beta: float,
    norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DTM: each pool token joins its most cosine-similar anchor of every anchor frame whose pool holds it.

    Args:
        x: ``(B, N, D)`` float32 tokens.
        indices: ``(B, T)`` kept positions (ascending; -1 at padded slots).
        is_anchor: ``(B, T)`` the slots that are anchors.
        pool: ``(B, N)`` tokens that may be merged (valid, not salient, not topped up).
        frame, seg_of_token, multi_of_token: ``(B, N)`` each token's frame, segment, and
            whether its frame's anchors merge over the whole segment.
        dropped: ``(B, N)`` valid tokens that are not kept (for ``sizes``).
        frames: ``F``.
        beta: the official ``DTM_beta``: an anchor keeps weight ``max(1 / (m + 1), beta)``.
        norms: ``(B, N)`` the tokens' norms (clamped as :func:`tokenreduce.ops.normalize`) for the
            CUDA form of the cosine similarities: one product of the tokens, over both norms.

    Returns ``(features (B, T, D), sizes (B, T), joined (B, N))``: an anchor becomes
    ``w x_a + (1 - w) mean(tokens that joined it)`` (itself included, as it is in its own
    pool); ``sizes`` count each dropped token once, split over the anchors it joined;
    ``joined`` is how many anchors each token joined.
    """
    b, t = indices.shape
    idx = indices.clamp(min=0)
    xa = ops.gather_rows(x, idx)
    fa, sa, ma = frame.gather(1, idx), seg_of_token.gather(1, idx), multi_of_token.gather(1, idx)
    reach = (frame.unsqueeze(2) == fa.unsqueeze(1)) | (ma.unsqueeze(1) & (seg_of_token.unsqueeze(2) == sa.unsqueeze(1)))
    allowed = pool.unsqueeze(2) & is_anchor.unsqueeze(1) & reach  # (B, N, T)
    if norms is None:
        sim = ops.cosine_similarity(x, xa)
    else:
        sim = torch.bmm(x, xa.transpose(1, 2)) / (norms.unsqueeze(2) * norms.gather(1, idx).unsqueeze(1))
    sim = sim.masked_fill(~allowed, float("-inf"))
    # One argmax per (token, anchor frame): a max over the anchor slots grouped by frame,
    # ties to the lower slot; slots that are no anchors form a spare group F.
    group = torch.where(is_anchor, fa, frames).unsqueeze(1).expand(b, x.shape[1], t)
    best = torch.full((b, x.shape[1], frames + 1), float("-inf"), device=x.device)
    best = best.scatter_reduce(2, group, sim, "amax")
    top = allowed & (sim == best.gather(2, group))
    slot = positions(t, x.device).expand_as(top)
    first = torch.full(best.shape, t, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(2, group, torch.where(top, slot, t), "amin")
    chosen = (top & (slot == first.gather(2, group))).float()
    members = chosen.sum(dim=1)  # (B, T)
    with ops.full_float32(x.device):  # sums of features
        mean = torch.bmm(chosen.transpose(1, 2), x) / members.clamp(min=1).unsqueeze(-1)
    w = (1.0 / (members + 1.0)).clamp(min=beta).unsqueeze(-1)  # 1 for slots that nothing joined
    if norms is None:
        merged = torch.where(is_anchor.unsqueeze(-1), w * xa + (1.0 - w) * mean, xa)
    else:  # one kernel; lerp's weight-1 end is exactly xa, so kept tokens are copied unchanged
        merged = torch.lerp(mean, xa, w)
    joined = chosen.sum(dim=2)
    share = dropped.float() / joined.clamp(min=1)
    sizes = 1.0 + torch.bmm(share.unsqueeze(1), chosen).squeeze(1)
    return merged, sizes, joined
