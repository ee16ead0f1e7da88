"""PruneVid's building blocks: DPC-KNN on many token sets at once, temporal segments, budget shares.

Used by :mod:`tokenreduce_plugins.prunevid`. Everything is batched over the sets (and rows);
the one Python loop (:func:`refine_segments`) runs over the frames, a count known on the host,
and never reads a device value.
"""

from __future__ import annotations

import math

import torch


def dpc_knn(x: torch.Tensor, mask: torch.Tensor, clusters: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (the official ``cluster_dpc_knn``), per set.

    With ``d(i, j) = ||x_i - x_j|| / sqrt(D)`` over a set's valid tokens: density
    ``rho_i = exp(-mean of the k smallest d(i, .)^2)`` (the token itself included);
    ``delta_i`` = distance to the nearest token of higher density (the largest distance in
    the set for the densest one); the ``clusters[p]`` tokens of highest ``rho * delta`` are
    the centres, and every other token joins its nearest centre (ties: the centre of higher
    score, as ``argmin`` over the official score-ordered centres).

    Args:
        x: ``(P, n, D)`` float32 features of ``P`` sets.
        mask: ``(P, n)`` bool, the valid tokens of each set.
        clusters: ``(P,)`` long, centres per set (``<=`` its valid count; 0 = none).
        k: neighbours for the density (sets smaller than ``k`` use all their tokens).

    Returns:
        ``(assign, center)``: ``(P, n)`` long, the index of the centre each token joins
        (its own for centres; -1 for invalid tokens and sets without centres), and the
        ``(P, n)`` bool centre mask.
    """
    p, n, d = x.shape
    dev = x.device
    idx = torch.arange(n, device=dev)
    dist = torch.cdist(x, x) / math.sqrt(d)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    near = torch.topk(dist.masked_fill(~pair, float("inf")), min(k, n), dim=2, largest=False).values
    per_set_k = mask.sum(dim=1).clamp(min=1, max=k)
    sq = torch.where(torch.isfinite(near), near.square(), torch.zeros_like(near)).sum(dim=2)
    density = torch.exp(-sq / per_set_k.unsqueeze(1))
    # The official code breaks density ties with 1e-6 of uniform noise; here a tie goes to
    # the lower index, which makes "higher density" a strict total order.
    dj, di = density.unsqueeze(1), density.unsqueeze(2)
    higher = ((dj > di) | ((dj == di) & (idx.view(1, 1, n) < idx.view(1, n, 1)))) & pair
    dist_max = dist.masked_fill(~pair, 0.0).amax(dim=(1, 2)).view(p, 1, 1)
    delta = torch.where(higher, dist, dist_max).amin(dim=2)
    score = (delta * density).masked_fill(~mask, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: lower index
    rank = torch.empty_like(order).scatter_(1, order, idx.expand(p, n))
    center = (rank < clusters.unsqueeze(1)) & mask
    # Token i to centre j: the official code reads the centres' rows, dist[j, i].
    to_center = dist.transpose(1, 2).masked_fill(~center.unsqueeze(1), float("inf"))
    tie = (to_center == to_center.amin(dim=2, keepdim=True)) & center.unsqueeze(1)
    nearest = torch.where(tie, rank.unsqueeze(1), torch.full_like(rank, n).unsqueeze(1)).argmin(dim=2)
    nearest = torch.where(center, idx.expand(p, n), nearest)
    assign = torch.where(mask & center.any(dim=1, keepdim=True), nearest, torch.full_like(nearest, -1))
    return assign, center


def refine_segments(labels: torch.Tensor) -> torch.Tensor:
    """Temporal segments from per-frame cluster labels (the official ``refine_clusters`` +
    ``segment_lengths``), batched: ``(B, T)`` segment id of each frame, ``0, 1, ...`` in time.

    Each label keeps only its longest runs of consecutive frames (all of equal length), and
    none if its longest run is one frame; every other run is relabelled, left to right,
    with the label of its longer neighbouring run (the left one on ties, the left run's
    length counting the runs relabelled before it; label 0 if it has no neighbour).
    Segments are the runs of equal labels afterwards.
    """
    b, t = labels.shape
    dev = labels.device
    pos = torch.arange(t, device=dev).expand(b, t)
    change = torch.ones(b, t, dtype=torch.bool, device=dev)
    change[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run_id = change.long().cumsum(dim=1) - 1
    run_len = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_add_(1, run_id, torch.ones_like(run_id))
    run_len = run_len.gather(1, run_id)
    longest = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_reduce(1, labels, run_len, "amax")
    longest = longest.gather(1, labels)
    kept = (run_len == longest) & (longest > 1)
    # The run right of each frame: the first kept frame at or after it (t: none).
    first_kept = torch.where(kept, pos, torch.full_like(pos, t)).flip(1).cummin(dim=1).values.flip(1)
    has_right = first_kept < t
    right_label = labels.gather(1, first_kept.clamp(max=t - 1))
    right_len = torch.where(has_right, run_len.gather(1, first_kept.clamp(max=t - 1)), torch.zeros_like(run_len))
    # Frames that open a relabelled run, all at once (the loop below only reads them).
    starts = ~kept
    starts[:, 1:] &= kept[:, :-1]
    prev_label = torch.full((b,), -1, dtype=torch.long, device=dev)
    prev_len = torch.zeros(b, dtype=torch.long, device=dev)
    steps = []
    # Made once: a Python scalar in where() becomes a device tensor (a fill kernel) per call.
    zero, one = torch.zeros((), dtype=torch.long, device=dev), torch.ones((), dtype=torch.long, device=dev)
    # One step per frame (T is known on the host), every row at once, nothing read back:
    # a relabelled run's choice depends on the runs relabelled before it. Nine kernels a
    # step; the labels are stacked once at the end.
    for i in range(t):
        chosen = torch.where(right_len[:, i] > prev_len, right_label[:, i], torch.where(prev_len > 0, prev_label, zero))
        label = torch.where(kept[:, i], labels[:, i], torch.where(starts[:, i], chosen, prev_label))
        prev_len = torch.where(label == prev_label, prev_len + 1, one)
        prev_label = label
        steps.append(label)
    final = torch.stack(steps, dim=1)
    new = torch.zeros(b, t, dtype=torch.long, device=dev)
    new[:, 1:] = (final[:, 1:] != final[:, :-1]).long()
    return new.cumsum(dim=1)


def apportion(total: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Split ``total (B,)`` over groups in proportion to ``weights (B, G)`` (long, ``>= 0``) by
    largest remainders (ties: the lower group), exactly in integers: ``(B, G)`` shares summing
    to ``total``, each at most ``ceil(total * w / sum w)``; zero-weight groups get nothing.
    Needs ``total <= sum(weights)`` per row (or ``total == 0``)."""
    wsum = weights.sum(dim=1, keepdim=True).clamp(min=1)
    q = total.unsqueeze(1) * weights
    base = torch.div(q, wsum, rounding_mode="floor")
    rem = q - base * wsum
    left = total - base.sum(dim=1)
    order = torch.sort(rem, dim=1, descending=True, stable=True).indices
    g = weights.shape[1]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(g, device=weights.device).expand_as(order))
    return base + (rank < left.unsqueeze(1)).long()
