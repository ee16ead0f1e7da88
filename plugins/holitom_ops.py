"""HoliTom's building blocks, batched over videos: temporal segmentation by dynamic programming,
static-token masks, DPC-kNN clustering with the official tie rules, and the budget split.

Shapes: ``B`` videos, ``T`` frames (host-known), ``n`` tokens per frame, ``D`` width. Nothing
here reads a device value on the host: the loops run over the host-known frame count only.
"""

from __future__ import annotations

import torch

from tokenreduce import ops


def pair_similar(x: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """``(B, T-1, n)`` bool: the token at each position is similar (cosine ``> tau``) in frames ``t`` and ``t+1``.

    A pair with a padded token is never similar (padding is never static).
    """
    u = ops.normalize(x)
    sim = (u[:, :-1] * u[:, 1:]).sum(dim=-1)
    return (sim > tau) & valid[:, :-1] & valid[:, 1:]


def static_runs(similar: torch.Tensor) -> torch.Tensor:
    """``(B, T, n)`` long: how many consecutive similar frame pairs start at frame ``s`` for each position.

    A position is static over frames ``s..e`` iff ``run[s] >= e - s``.
    """
    b, pairs, n = similar.shape
    t = pairs + 1
    k = torch.arange(pairs, device=similar.device).view(1, -1, 1)
    # First dissimilar pair at or after k (t-1 = none): a reverse running minimum.
    fail = torch.where(similar, torch.full_like(k, t - 1).expand(b, pairs, n), k.expand(b, pairs, n))
    next_fail = fail.flip(1).cummin(dim=1).values.flip(1)
    run = next_fail - k
    return torch.cat([run, run.new_zeros(b, 1, n)], dim=1)


def window_gains(run: torch.Tensor) -> torch.Tensor:
    """``(B, T, T)`` long: ``gain[s, e]`` = tokens removed by averaging the static tokens of frames ``s..e``.

    The official ``pruned_static_count``: (tokens static over the whole window) x (window
    length - 1); 0 for ``e <= s``.
    """
    t = run.shape[1]
    span = torch.arange(t, device=run.device)
    # at_least[b, s, L] = positions whose run from frame s is >= L.
    at_least = (run.unsqueeze(-1) >= span.view(1, 1, 1, -1)).sum(dim=2)
    length = span.view(1, -1) - span.view(-1, 1)  # e - s
    idx = length.clamp(min=0).unsqueeze(0).expand(run.shape[0], t, t)
    return torch.where(length > 0, length * at_least.gather(2, idx), 0)


def segment_starts(gain: torch.Tensor, max_window: int) -> torch.Tensor:
    """``(B, T)`` long: the first frame of the segment each frame belongs to.

    The official DP (``select_static_windows``): ``dp[i] = max(dp[i-1], max_w dp[i-w] +
    gain[i-w+1, i])`` over window lengths ``2 <= w <= max_window``; on equal values the shorter
    window wins (the official loop replaces only on a strictly larger value; ``argmax`` returns
    the first maximum of the candidates in that order). Then the backtrack from the last frame.
    Both run a host-known number of steps (frames; log2 of them), with no device read.
    """
    b, t, _ = gain.shape
    dev = gain.device
    w = min(t, max_window)
    # starts[i, k] = i - k, the first frame of the window of length k + 1 ending at frame i
    # (clamped where it would precede frame 0; those candidates are cut off below), and the
    # gains of all those windows, gathered once instead of once a frame.
    frame = torch.arange(t, device=dev)
    starts = (frame.view(-1, 1) - frame[:w].view(1, -1)).clamp(min=0)  # (T, w)
    window_gain = gain[:, starts, frame.view(-1, 1)]  # (B, T, w): gain[b, i - k, i]
    dp = gain.new_zeros(b, t + 1)  # dp[:, i + 1]: best total over frames 0..i; dp[:, 0] = 0
    best = []
    for i in range(t):  # host-known frame count (graph-capturable: no host read); four kernels a frame
        n_w = min(i + 1, max_window)  # windows of length 1, 2, ..., n_w
        # max over dim: the value and the first index of the maximum (the shortest window on ties).
        value, pick = (dp[:, starts[i, :n_w]] + window_gain[:, i, :n_w]).max(dim=1)
        dp[:, i + 1] = value
        best.append(pick)
    first = frame - torch.stack(best, dim=1)  # first frame of the best last window ending at frame i
    # Backtrack from the last frame: the windows' first frames are those of the frames on the
    # chain t-1 -> first[t-1] - 1 -> ... (frame -1, ending it, is the sink t). The chain's
    # frames are found by pointer doubling (ceil(log2(T + 1)) rounds instead of T steps):
    # after round r, ``on`` holds the chain's first 2^r frames and ``jump`` the 2^r-th successor.
    jump = torch.cat([torch.where(first > 0, first - 1, t), torch.full((b, 1), t, device=dev)], dim=1)
    on = torch.zeros(b, t + 1, dtype=torch.long, device=dev)
    on[:, t - 1] = 1
    for _ in range(t.bit_length()):  # 2^rounds >= T: the whole chain
        on = on | torch.zeros_like(on).scatter_add_(1, jump, on).clamp(max=1)
        jump = jump.gather(1, jump)
    is_start = torch.zeros(b, t + 1, dtype=torch.bool, device=dev)
    is_start.scatter_(1, torch.where(on[:, :t] > 0, first, t), True)
    frame = frame.expand(b, t)
    return torch.where(is_start[:, :t], frame, 0).cummax(dim=1).values


def segment_lengths(start: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` long: the length of the segment each frame belongs to."""
    b, t = start.shape
    same = start.unsqueeze(2) == start.unsqueeze(1)
    return same.sum(dim=2)


def self_attention_received(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, T, n)``: attention each token receives within its frame, with the tokens as queries and keys.

    ``softmax(x x^T / sqrt(D))`` over the frame's valid tokens, averaged over its valid
    queries: the stand-in for the vision tower's attention when no adapter provides it.
    """
    d = x.shape[-1]
    logits = x @ x.transpose(-1, -2) / d**0.5  # (B, T, n, n)
    logits = logits.masked_fill(~valid.unsqueeze(-2), float("-inf"))
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0) * valid.unsqueeze(-1)
    return attn.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp(min=1)


def allocation_order(key: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` rank of each slot when sorted by ``key``, then ``tie``, then index (all ascending)."""
    by_tie = torch.sort(tie, dim=1, stable=True).indices
    order = by_tie.gather(1, torch.sort(key.gather(1, by_tie), dim=1, stable=True).indices)
    pos = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


def dpc_clusters(
    x: torch.Tensor, member: torch.Tensor, clusters: torch.Tensor, neighbours: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of each group's members (the official ``cluster_dpc_knn`` and assignment).

    Args:
        x: ``(G, L, D)`` float32 features.
        member: ``(G, L)`` bool, the group's tokens.
        clusters: ``(G,)`` clusters per group (``<=`` members; 0 = the group is dropped).
        neighbours: ``(G,)`` the ``k`` of the kNN density (``1 <= k <= clusters`` where clusters > 0).

    Distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the k smallest d^2)`` (self
    included); ``delta`` = distance to the nearest denser member (the group's largest distance
    for the densest); the ``clusters`` members with the largest ``delta * density`` are centres;
    every other member joins its nearest centre (the first, by position, on equal distances).
    The official code adds ``1e-6 * rand`` to the densities to break ties at random; here the
    earlier member counts as the denser one, and equal scores go to the earlier member.

    Returns ``(centre (G, L) bool, assign (G, L) long)``: the centre position each member
    joins (its own for a centre; -1 for non-members and members of a dropped group).
    """
    g, length, d = x.shape
    dev = x.device
    pair = member.unsqueeze(2) & member.unsqueeze(1)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5
    inf = torch.full((), float("inf"), device=dev)  # made on the device: no host-to-device copy (graph-safe)
    nearest = torch.sort(torch.where(pair, dist, inf), dim=2).values
    first_k = torch.arange(length, device=dev).view(1, 1, -1) < neighbours.view(-1, 1, 1)
    # Members' rows hold their member distances first (the rest is inf), k <= members.
    sq = torch.where(first_k, nearest.square(), 0.0).sum(dim=2)
    density = torch.exp(-sq / neighbours.clamp(min=1).view(-1, 1).float())
    idx = torch.arange(length, device=dev)
    tie = (density.unsqueeze(1) == density.unsqueeze(2)) & (idx.view(1, 1, -1) < idx.view(1, -1, 1))
    denser = ((density.unsqueeze(1) > density.unsqueeze(2)) | tie) & pair  # [g, i, j]: j denser than i
    dist_max = torch.where(pair, dist, -inf).flatten(1).amax(dim=1).clamp(min=0).view(-1, 1, 1)
    delta = torch.where(denser, dist, dist_max).amin(dim=2)
    score = torch.where(member, delta * density, -inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, idx.expand_as(order))
    centre = member & (rank < clusters.unsqueeze(1))
    to_centre = torch.where(centre.unsqueeze(1), dist, inf)
    nearest_centre = to_centre.argmin(dim=2)
    joined = member & centre.any(dim=1, keepdim=True)
    assign = torch.where(centre, idx.expand_as(centre), nearest_centre)
    return centre, torch.where(joined, assign, -1)


def merge_clusters(
    x: torch.Tensor, centre: torch.Tensor, assign: torch.Tensor, weight: torch.Tensor, beta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (G, L, D), sizes (G, L))`` of the centres after merging their members.

    ``beta`` set: ``beta * centre + (1 - beta) * mean(other members)`` (the official default);
    ``None``: the mean of the centre and its members (official ``NO_BETA=1``). A centre
    without other members keeps its features. ``weight (G, L)`` counts the tokens each member
    stands for (its ``sizes``).
    """
    length = x.shape[1]
    others = torch.where(centre, -1, assign)
    sums, count = ops.merge_into(x, others, length)
    if beta is None:
        merged = (x + sums) / (1.0 + count).unsqueeze(-1)
    else:
        merged = beta * x + (1.0 - beta) * sums / count.clamp(min=1).unsqueeze(-1)
    features = torch.where((count > 0).unsqueeze(-1), merged, x)
    size_sums, _ = ops.merge_into(weight.unsqueeze(-1), others, length)
    return features, (weight + size_sums.squeeze(-1)) * centre
