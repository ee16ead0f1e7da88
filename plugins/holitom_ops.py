"""HoliTom's building blocks, batched over videos: temporal segmentation by dynamic programming,
static-token masks, DPC-kNN clustering with the official tie rules, and the budget split.

Shapes: ``B`` videos, ``T`` frames (host-known), ``n`` tokens per frame, ``D`` width. Nothing
here reads a device value on the host: the loops run over the host-known frame count only.
"""

from __future__ import annotations

import math

import torch

from tokenreduce import ops

from .prunevid_cluster import SCAN_MAX_FRAMES, constant, gram_norms, positions
from .ranking import fused_centres, stable_rank

#: "No edge" in the segment DP's max-plus products: far below any total (gains are at most
#: frames x tokens), and sums of a few of them stay far from the int64 limits.
_NO_EDGE = -(2**40)


def pair_similar(x: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """``(B, T-1, n)`` bool: the token at each position is similar (cosine ``> tau``) in frames ``t`` and ``t+1``.

    A pair with a padded token is never similar (padding is never static).
    """
    u = ops.normalize(x)
    sim = (u[:, :-1] * u[:, 1:]).sum(dim=-1)
    return (sim > tau) & valid[:, :-1] & valid[:, 1:]


def adjacent_similar(gram: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`pair_similar` from each position's Gram matrix over the frames (``(B, n, T, T)``,
    :func:`~tokenreduce_plugins.prunevid_cluster.position_gram`; the CUDA form): the cosine of
    frames ``t`` and ``t+1`` is their entry over both norms."""
    norm = gram_norms(gram)  # (B, n, T)
    cos = torch.diagonal(gram, offset=1, dim1=2, dim2=3) / (norm[..., :-1] * norm[..., 1:])
    return (cos.transpose(1, 2) > tau) & valid[:, :-1] & valid[:, 1:]


def static_runs(similar: torch.Tensor) -> torch.Tensor:
    """``(B, T, n)`` long: how many consecutive similar frame pairs start at frame ``s`` for each position.

    A position is static over frames ``s..e`` iff ``run[s] >= e - s``.
    """
    b, pairs, n = similar.shape
    if pairs == 0:
        return similar.new_zeros(b, 1, n, dtype=torch.long)
    # The first dissimilar pair at or after k, less k (pairs - k: none), as the least entry over the
    # pairs j of a tabled row: j - k for a dissimilar pair at or after k, else pairs - k; the last
    # frame (row pairs) starts no pair: 0.
    at, none = constant("static_runs", pairs, similar.device, lambda: _run_tables(pairs, similar.device))
    return torch.where(similar.unsqueeze(1), none, at).amin(dim=2)


def _run_tables(pairs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs + 1, pairs, 1)`` and ``(pairs + 1, 1, 1)`` long tables of :func:`static_runs`."""
    k = torch.arange(pairs + 1, device=device).view(-1, 1)
    j = torch.arange(pairs, device=device).view(1, -1)
    at = torch.where(j >= k, j - k, pairs - k)
    return at.unsqueeze(-1), (pairs - k).view(-1, 1, 1)


def window_gains(run: torch.Tensor) -> torch.Tensor:
    """``(B, T, T)`` long: ``gain[s, e]`` = tokens removed by averaging the static tokens of frames ``s..e``.

    The official ``pruned_static_count``: (tokens static over the whole window) x (window
    length - 1); 0 for ``e <= s``.
    """
    t = run.shape[1]
    span = positions(t, run.device)
    # at_least[b, s, L] = positions whose run from frame s is >= L.
    at_least = (run.unsqueeze(-1) >= span.view(1, 1, 1, -1)).sum(dim=2)
    # e - s, 0 for e <= s (where the gain is 0).
    length = constant("window_lengths", t, run.device, lambda: (span.view(1, -1) - span.view(-1, 1)).clamp(min=0))
    return length * at_least.gather(2, length.expand(run.shape[0], t, t))


def segment_starts(gain: torch.Tensor, max_window: int) -> torch.Tensor:
    """``(B, T)`` long: the first frame of the segment each frame belongs to.

    The official DP (``select_static_windows``): ``dp[i] = max(dp[i-1], max_w dp[i-w] +
    gain[i-w+1, i])`` over window lengths ``2 <= w <= max_window``; on equal values the shorter
    window wins (the official loop replaces only on a strictly larger value; ``argmax`` returns
    the first maximum of the candidates in that order). Then the backtrack from the last frame.
    Both run a host-known number of steps (log2 of the frames, or the frames for long videos),
    with no device read.
    """
    b, t, _ = gain.shape
    dev = gain.device
    w = min(t, max_window)
    # starts[i, k] = i - k, the first frame of the window of length k + 1 ending at frame i
    # (clamped where it would precede frame 0; those candidates are cut off below), and the
    # gains of all those windows, gathered once instead of once a frame.
    frame = positions(t, dev)
    starts = constant(f"window_starts/{w}", t, dev, lambda: (frame.view(-1, 1) - frame[:w].view(1, -1)).clamp(min=0))
    window_gain = gain[:, starts, frame.view(-1, 1)]  # (B, T, w): gain[b, i - k, i]
    if t <= SCAN_MAX_FRAMES:
        dp = _best_totals(gain, max_window)
    else:
        dp = _best_totals_by_frame(window_gain, starts, max_window)
    # Each frame's best last window, all frames at once: argmax's first maximum is the shortest one.
    # Windows reaching before frame 0 (k > i) are out: -1 is below every total.
    beyond = constant(f"window_beyond/{w}", t, dev, lambda: frame[:w].view(1, -1) > frame.view(-1, 1))
    pick = (dp[:, starts] + window_gain).masked_fill(beyond, -1).argmax(dim=2)
    first = frame - pick  # first frame of the best last window ending at frame i
    # Backtrack from the last frame: the windows' last frames are the chain t-1 -> first[t-1] - 1
    # -> ... (frame -1, ending it, is the sink t, which stays there). The chain is listed by
    # doubling (ceil(log2 T) rounds, not T steps): after round r, ``chain`` holds its first 2^r
    # frames and ``jump`` maps a frame to its 2^r-th successor.
    # Frames are numbered from 1 here, so the sink is 0 and frame e's successor is first[e] (- 1 + 1).
    jump = torch.nn.functional.pad(first, (1, 0))
    chain = jump.new_full((b, 1), t)
    for r in range(math.ceil(math.log2(t)) if t > 1 else 0):
        chain = torch.cat([chain, jump.gather(1, chain)], dim=1)
        if (2 << r) < t:
            jump = jump.gather(1, jump)
    # The chain's windows open at their last frames' first frames (the sink: a spare column t).
    opens = torch.nn.functional.pad(first, (1, 0), value=t).gather(1, chain)
    is_start = torch.zeros(b, t + 1, dtype=torch.bool, device=dev).scatter_(1, opens, True)
    return (frame * is_start[:, :t]).cummax(dim=1).values


def _best_totals(gain: torch.Tensor, max_window: int) -> torch.Tensor:
    """``(B, T + 1)`` long ``dp``: ``dp[v]`` the most tokens removed over frames ``0 .. v-1``.

    The DP is a longest path from node 0 to node ``v`` over nodes ``0 .. T``, an edge ``u -> v``
    (``1 <= v - u <= max_window``) for the window of frames ``u .. v-1``, weighing its gain:
    the max-plus closure of the edge matrix, by ``ceil(log2 T)`` squarings (host-known, two
    kernels each; integers, so exactly the values of the frame-by-frame loop).
    """
    b, t, _ = gain.shape
    dev = gain.device

    def no_edges() -> torch.Tensor:  # (T+1, T+1): [v, u] neither an edge u -> v nor v == u (paths may stop)
        node = torch.arange(t + 1, device=dev)
        span = node.view(-1, 1) - node.view(1, -1)
        return (span < 0) | (span > max_window)

    # a[v, u] = gain[u, v - 1] (frames u .. v-1); the diagonal is gain[v, v - 1] = 0, a path that stops.
    a = torch.nn.functional.pad(gain.transpose(1, 2), (0, 1, 1, 0))
    a = a.masked_fill(constant(f"segment_no_edges/{max_window}", t, dev, no_edges), _NO_EDGE)
    for _ in range(math.ceil(math.log2(t)) if t > 1 else 0):  # paths of up to 2^r edges; T edges at most
        a = (a.unsqueeze(3) + a.unsqueeze(1)).amax(dim=2)
    return a[:, :, 0]


def _best_totals_by_frame(window_gain: torch.Tensor, starts: torch.Tensor, max_window: int) -> torch.Tensor:
    """:func:`_best_totals` one frame after the other (long videos, where the closure's ``T^3`` grows)."""
    b, t, _ = window_gain.shape
    dp = window_gain.new_zeros(b, t + 1)  # dp[:, i + 1]: best total over frames 0..i; dp[:, 0] = 0
    for i in range(t):  # host-known frame count (graph-capturable: no host read)
        n_w = min(i + 1, max_window)  # windows of length 1, 2, ..., n_w
        dp[:, i + 1] = (dp[:, starts[i, :n_w]] + window_gain[:, i, :n_w]).amax(dim=1)
    return dp


def segment_lengths(start: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` long: the length of the segment each frame belongs to."""
    b, t = start.shape
    same = start.unsqueeze(2) == start.unsqueeze(1)
    return same.sum(dim=2)


def self_attention_received(
    x: torch.Tensor, valid: torch.Tensor | None, gram: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, T, n)``: attention each token receives within its frame, with the tokens as queries and keys.

    ``softmax(x x^T / sqrt(D))`` over the frame's valid tokens, averaged over its valid
    queries: the stand-in for the vision tower's attention when no adapter provides it.
    ``valid=None``: every token is valid (no masking passes); ``gram``: the frames' ``x x^T``
    when the caller has it.
    """
    b, t, n, d = x.shape
    logits = (x @ x.transpose(-1, -2) if gram is None else gram) / d**0.5  # (B, T, n, n)
    if valid is None:
        return torch.softmax(logits, dim=-1).sum(dim=-2) / n
    logits = logits.masked_fill(~valid.unsqueeze(-2), float("-inf"))
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0) * valid.unsqueeze(-1)
    return attn.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp(min=1)


def allocation_order(key: torch.Tensor, first: torch.Tensor, separation: float | None = None) -> torch.Tensor:
    """``(B, N)`` rank of each slot when sorted by ``key`` (ascending), then ``first`` (long, 1
    before 0), then index.

    ``separation``: when the caller knows that distinct keys differ by at least that much, and
    the keys are float64 in ``[0, 2]`` or ``inf`` and ``first`` is 0 or 1: one stable sort of
    ``key - separation / 4 * first`` (below ``2^-20`` the shift stays far above the keys' ulps,
    so it orders equal keys only)."""
    if separation is not None and separation >= 2.0**-20:
        return stable_rank(torch.add(key, first, alpha=-separation / 4))
    by_tie = torch.sort(first, dim=1, descending=True, stable=True).indices
    order = by_tie.gather(1, torch.sort(key.gather(1, by_tie), dim=1, stable=True).indices)
    return torch.empty_like(order).scatter_(1, order, positions(key.shape[1], key.device).expand_as(order))


def dpc_clusters(
    x: torch.Tensor | None,
    member: torch.Tensor,
    clusters: torch.Tensor,
    neighbours: torch.Tensor,
    dist: torch.Tensor | None = None,
    max_neighbours: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of each group's members (the official ``cluster_dpc_knn`` and assignment).

    Args:
        x: ``(G, L, D)`` float32 features (not read when ``dist`` is given).
        member: ``(G, L)`` bool, the group's tokens.
        clusters: ``(G,)`` clusters per group (``<=`` members; 0 = the group is dropped).
        neighbours: ``(G,)`` the ``k`` of the kNN density (``1 <= k <= clusters`` where clusters > 0).
        dist: ``(G, L, L)`` the distances below when the caller has them (the CUDA Gram form).
        max_neighbours: a cap on ``neighbours`` (the official ``min(k, clusters)``: the caller may
            pass the clusters as ``neighbours``); only the nearest that many are ranked.

    Distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the k smallest d^2)`` (self
    included); ``delta`` = distance to the nearest denser member (the group's largest distance
    for the densest); the ``clusters`` members with the largest ``delta * density`` are centres;
    every other member joins its nearest centre (the first, by position, on equal distances).
    The official code adds ``1e-6 * rand`` to the densities to break ties at random; here the
    earlier member counts as the denser one, and equal scores go to the earlier member.

    Returns ``(centre (G, L) bool, assign (G, L) long)``: the centre position each member
    joins (its own for a centre; -1 for non-members and members of a dropped group).
    """
    if dist is None:
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5
    g, length, _ = dist.shape
    dev = dist.device
    inf = float("inf")
    outside = ~member
    apart = outside.unsqueeze(2) | outside.unsqueeze(1)
    within = dist.masked_fill(apart, inf)
    # The nearest first (ascending: as a sort's first entries); members' rows hold their member
    # distances first (the rest is inf), k <= members.
    ranked = min(length, max_neighbours) if max_neighbours is not None else length
    nearest = torch.topk(within, ranked, dim=2, largest=False).values
    idx = positions(length, dev)
    sq = nearest.square().masked_fill(idx[:ranked].view(1, 1, -1) >= neighbours.view(-1, 1, 1), 0.0).sum(dim=2)
    # -max(min(k, cap), 1) per k (float32, exact): (-a) / b = a / (-b), exactly. (The mask above
    # needs no cap: it covers the first min(length, cap) entries only.)
    cap = length if max_neighbours is None else max_neighbours
    neg_k = constant(
        f"dpc_neg_neighbours/{cap}", length, dev, lambda: -positions(length + 1, dev).clamp(min=1, max=cap).float()
    )
    density = torch.exp(sq / neg_k[neighbours].view(-1, 1))
    done = fused_centres(dist, density, member, clusters, by_rank=False)
    if done is not None:  # the rest as one kernel (CUDA, Triton): the same bits
        return done[1], done[0]
    # [g, i, j]: j denser than i, the earlier one on equal densities.
    lower = constant("lower", length, dev, lambda: idx.view(1, -1) < idx.view(-1, 1))
    dj, di = density.unsqueeze(1), density.unsqueeze(2)
    denser = torch.where(lower, dj >= di, dj > di)
    dist_max = dist.masked_fill(apart, 0.0).amax(dim=(1, 2)).view(-1, 1, 1)  # distances are >= 0
    # Pairs across the mask read inf, above dist_max, which a member's own entry (never denser)
    # always offers: the minimum is that over the group's members.
    delta = torch.where(denser, within, dist_max).amin(dim=2)
    score = (delta * density).masked_fill(outside, -inf)
    rank = stable_rank(score, descending=True)
    # Members score >= 0, others -inf: with clusters <= members, the first ranks are members.
    centre = rank < clusters.unsqueeze(1)
    # Non-centres' columns (and pairs across the mask) read inf: a token whose least entry is inf
    # joins no centre (a non-member, or a member of a group without centres).
    least, nearest_centre = within.masked_fill(~centre.unsqueeze(1), inf).min(dim=2)
    assign = torch.where(centre, idx, nearest_centre)
    return centre, assign.masked_fill(least == inf, -1)


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

