"""PruneVid's building blocks: DPC-KNN on many token sets at once, temporal segments, budget shares;
and what the video reducers share (PruneVid, HoliTom, FastVID all cluster with DPC-kNN): the Gram-matrix
forms of their distances and similarities on CUDA (:func:`tokenreduce.ops.cuda_formulas`) and index
tensors made once per size.

Used by :mod:`tokenreduce_plugins.prunevid`. Everything is batched over the sets (and rows);
the Python loops run over host-known counts (rounds of a scan over the frames) and never
read a device value.
"""

from __future__ import annotations

import math

import torch

from .constants import constant, positions
from .ranking import fused_centres, rank_and_order, stable_order, stable_rank

#: Cosine similarity of a zero vector is 0 (its norm is clamped), as :func:`tokenreduce.ops.normalize`.
NORM_EPS = 1e-12
#: Longest video (frames) whose segment refinement runs as a scan over state tables
#: (``(T + 1)^2`` states a frame); longer ones step through the frames.
SCAN_MAX_FRAMES = 64


def first_true(flags: torch.Tensor, t: int, slots: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, t)``: the positions of the first ``t`` set ``flags`` (``(B, N)`` uint8) of each row,
    ascending; ``slots`` (``(B, t)``) marks the real ones (others -1; ``None``: all are).

    One stable sort of the flags (set first, in position order), not a sort of positions
    keyed by a mask (no fill, no select)."""
    first = stable_order(flags, descending=True)[:, :t]
    return first if slots is None else first.masked_fill(~slots, -1)


def gram_distances(gram: torch.Tensor) -> torch.Tensor:
    """``(..., n, n)`` Euclidean distances from a Gram matrix: ``sqrt(max(g_ii + g_jj - 2 g_ij, 0))``.

    The CUDA form of the pairwise distances (one product, in full float32 under
    :func:`tokenreduce.ops.full_float32`, instead of ``cdist``'s direct kernel): a token's
    distance to itself is exactly 0, others carry the product's rounding.
    """
    sq = gram.diagonal(dim1=-2, dim2=-1)
    return torch.add(sq.unsqueeze(-1) + sq.unsqueeze(-2), gram, alpha=-2.0).clamp_min(0.0).sqrt()


def position_gram(x: torch.Tensor) -> torch.Tensor:
    """``(B, L, T, T)``: for each position of ``x (B, T, L, D)`` (frames of ``L`` tokens), the Gram
    matrix of its ``T`` frames' tokens: one batched product over the positions."""
    b, t, per, d = x.shape
    by_position = x.transpose(1, 2).reshape(b * per, t, d)
    return torch.bmm(by_position, by_position.transpose(1, 2)).view(b, per, t, t)


def gram_norms(gram: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` vector norms from a Gram matrix's diagonal, clamped as :func:`tokenreduce.ops.normalize`."""
    return gram.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(NORM_EPS)


def dpc_knn(
    x: torch.Tensor | None,
    mask: torch.Tensor | None,
    clusters: torch.Tensor | int,
    k: int,
    dist: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (the official ``cluster_dpc_knn``), per set.

    With ``d(i, j) = ||x_i - x_j|| / sqrt(D)`` over a set's valid tokens: density
    ``rho_i = exp(-mean of the k smallest d(i, .)^2)`` (the token itself included);
    ``delta_i`` = distance to the nearest token of higher density (the largest distance in
    the set for the densest one); the ``clusters[p]`` tokens of highest ``rho * delta`` are
    the centres, and every other token joins its nearest centre (ties: the centre of higher
    score, as ``argmin`` over the official score-ordered centres).

    Args:
        x: ``(P, n, D)`` float32 features of ``P`` sets (not read when ``dist`` is given).
        mask: ``(P, n)`` bool, the valid tokens of each set; ``None``: all of them.
        clusters: ``(P,)`` long (or one host int for every set), centres per set (``<=`` its
            valid count; 0 = none).
        k: neighbours for the density (sets smaller than ``k`` use all their tokens).
        dist: ``(P, n, n)`` the distances ``d`` when the caller has them (its CUDA Gram form).

    Returns:
        ``(assign, center)``: ``(P, n)`` long, the index of the centre each token joins
        (its own for centres; -1 for invalid tokens and sets without centres), and the
        ``(P, n)`` bool centre mask.
    """
    if dist is None:
        dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    p, n, _ = dist.shape
    dev = dist.device
    idx = positions(n, dev)
    # lower[i, j]: j < i. The official code breaks density ties with 1e-6 of uniform noise; here
    # a tie goes to the lower index, which makes "higher density" a strict total order.
    lower = constant("lower", n, dev, lambda: idx.view(1, n) < idx.view(n, 1))
    if mask is None:
        near = torch.topk(dist, min(k, n), dim=2, largest=False).values
        density = torch.exp(near.square().sum(dim=2) / -min(k, n))  # (-a) / b = a / (-b), exactly
    else:
        outside = ~mask
        apart = outside.unsqueeze(2) | outside.unsqueeze(1)
        within = dist.masked_fill(apart, float("inf"))
        near = torch.topk(within, min(k, n), dim=2, largest=False).values
        # -min(max(members, 1), k) per member count (float32, exact): (-a) / b = a / (-b), exactly.
        neg_k = constant(f"dpc_neg_k/{k}", n, dev, lambda: -positions(n + 1, dev).clamp(min=1, max=k).float())
        sq = near.nan_to_num(posinf=0.0).square().sum(dim=2)  # the inf beyond a small set's members: 0
        density = torch.exp(sq / neg_k[mask.sum(dim=1)].unsqueeze(1))
    done = fused_centres(dist, density, mask, clusters, by_rank=True)
    if done is not None:  # the rest as one kernel (CUDA, Triton): the same bits
        return done
    dj, di = density.unsqueeze(1), density.unsqueeze(2)
    higher = torch.where(lower, dj >= di, dj > di)
    if mask is None:
        dist_max = dist.amax(dim=(1, 2)).view(p, 1, 1)
        score = torch.where(higher, dist, dist_max).amin(dim=2) * density
    else:
        dist_max = dist.masked_fill(apart, 0.0).amax(dim=(1, 2)).view(p, 1, 1)
        # Pairs across the mask read inf, above dist_max, which a token's own entry (never
        # higher) always offers: the minimum is that over its set's members.
        score = (torch.where(higher, within, dist_max).amin(dim=2) * density).masked_fill(outside, float("-inf"))
    rank, order = rank_and_order(score, descending=True)  # ties: lower index
    # Valid tokens score >= 0, invalid ones -inf: with clusters <= the valid count, the centres
    # (the first ranks) are valid tokens.
    cut = clusters.view(p, 1, 1) if isinstance(clusters, torch.Tensor) else clusters
    center = rank < cut[:, 0] if isinstance(cut, torch.Tensor) else rank < cut
    # Token i to centre j: the official code reads the centres' rows, dist[j, i]. With the
    # columns in score order the centres come first, and argmin's first minimum is the nearest
    # centre of best score.
    if isinstance(clusters, torch.Tensor):
        # Non-centres' columns (and with a mask, pairs across it) read inf: a token whose least
        # entry is inf joins no centre (an invalid token, or a set without centres).
        by_score = (dist if mask is None else within).transpose(1, 2).gather(2, order.unsqueeze(1).expand(p, n, n))
        least, column = by_score.masked_fill(idx.view(1, 1, n) >= cut, float("inf")).min(dim=2)
        nearest = torch.where(center, idx, order.gather(1, column))
        return nearest.masked_fill(least == float("inf"), -1), center
    if clusters == 0:
        return torch.full((p, n), -1, dtype=torch.long, device=dev), center
    # A host count: only the centres' columns are read (the same first minimum).
    by_score = dist.transpose(1, 2).gather(2, order[:, :clusters].unsqueeze(1).expand(p, n, clusters))
    nearest = torch.where(center, idx, order.gather(1, by_score.argmin(dim=2)))
    return (nearest if mask is None else nearest.masked_fill(outside, -1)), center


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
    # Runs of equal labels: a frame opens one where its label differs from the previous frame's
    # (labels are >= 0, so the -1 before frame 0 always differs).
    run_id = (labels != torch.nn.functional.pad(labels[:, :-1], (1, 0), value=-1)).cumsum(dim=1)
    run_len = (run_id.unsqueeze(2) == run_id.unsqueeze(1)).sum(dim=2)  # (B, T) length of each frame's run
    longest = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_reduce(1, labels, run_len, "amax")
    longest = longest.gather(1, labels)
    kept = (run_len == longest) & (longest > 1)
    # The run right of each frame: the first kept frame at or after it (t: none), as the least
    # entry of a tabled row (j at or after the frame, t before it) over the kept frames.
    after = constant("frames_at_or_after", t, dev, lambda: _at_or_after(t, dev))
    first_kept = torch.where(kept.unsqueeze(1), after[:t], after[t, 0]).amin(dim=2)
    if t > SCAN_MAX_FRAMES:
        return _relabel_steps(labels, kept, run_len, first_kept)
    return _relabel_scan(labels, kept, run_len, first_kept)


def _at_or_after(t: int, device: torch.device) -> torch.Tensor:
    """``(T + 1, T)`` long: ``j`` where ``j >= i``, else ``T`` (a frame after the last; all of row T)."""
    frame = torch.arange(t, device=device)
    return torch.where(torch.arange(t + 1, device=device).view(-1, 1) <= frame, frame, t)


def _segment_ids(final: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` segment ids of the runs of equal final labels."""
    return torch.nn.functional.pad((final[:, 1:] != final[:, :-1]).cumsum(dim=1), (1, 0))


def _relabel_steps(labels, kept, run_len, first_kept) -> torch.Tensor:
    """The relabelling, one step per frame (long videos): ``(B, T)`` segment ids."""
    b, t = labels.shape
    dev = labels.device
    right = first_kept.clamp(max=t - 1)
    right_label = labels.gather(1, right)
    right_len = run_len.gather(1, right) * (first_kept < t)
    # Frames that open a relabelled run: the only ones that choose a label.
    starts = ~kept
    starts[:, 1:] &= kept[:, :-1]
    prev_label = torch.full((b,), -1, dtype=torch.long, device=dev)
    prev_len = torch.zeros(b, dtype=torch.long, device=dev)
    steps = []
    # Made once: a Python scalar in where() becomes a device tensor (a fill kernel) per call.
    zero, one = torch.zeros((), dtype=torch.long, device=dev), torch.ones((), dtype=torch.long, device=dev)
    # One step per frame (T is known on the host), every row at once, nothing read back:
    # a relabelled run's choice depends on the runs relabelled before it.
    for i in range(t):
        chosen = torch.where(right_len[:, i] > prev_len, right_label[:, i], torch.where(prev_len > 0, prev_label, zero))
        label = torch.where(kept[:, i], labels[:, i], torch.where(starts[:, i], chosen, prev_label))
        prev_len = torch.where(label == prev_label, prev_len + 1, one)
        prev_label = label
        steps.append(label)
    return _segment_ids(torch.stack(steps, dim=1))


def _relabel_scan(labels, kept, run_len, first_kept) -> torch.Tensor:
    """The relabelling as a prefix scan: ``(B, T)`` segment ids, as :func:`_relabel_steps`.

    The left-to-right pass carries a state, (label, run length) of the frame before. Each
    frame's step is tabled over every state ``s = (label + 1) (T + 1) + length`` (labels
    ``-1 .. T-1``, lengths ``0 .. T``), and the tables are composed by doubling
    (``ceil(log2 T)`` rounds of one gather each; host-known, nothing read back), so frame
    ``i``'s table maps the start state to the state after frame ``i``: a few dozen kernels
    instead of several per frame.

    Every relabelled frame may choose, not only the first of its stretch: after the first,
    the run before it (the stretch so far) is longer than the first's choice needed, so the
    rule picks that run's label again. A new segment opens where the run length is 1.
    """
    b, t = labels.shape
    tables = constant("relabel_states", t, labels.device, lambda: _states(t, labels.device))
    prev_at, base, longer = (tables[i].view(1, 1, -1) for i in range(3))
    prev_len = tables[3].view(1, 1, -1)
    # Each frame's label as (label + 1) m, and the label and length of the run right of it
    # (a spare column t past the last frame: length 0, never chosen).
    lab = torch.addcmul(tables[4, 0], labels, tables[4, 0])
    right = torch.nn.functional.pad(torch.stack([lab, run_len], dim=1), (0, 1)).gather(
        2, first_kept.unsqueeze(1).expand(b, 2, t)
    )
    r_label, r_len = right[:, 0].unsqueeze(-1), right[:, 1].unsqueeze(-1)
    # The step of _relabel_steps on every state at once; ``base`` is the label before (0 in the start state).
    label = torch.where(kept.unsqueeze(-1), lab.unsqueeze(-1), torch.where(r_len > prev_len, r_label, base))
    # The length after: one more on the same label (capped: lengths beyond T occur in no video), else 1.
    table = label + torch.where(label == prev_at, longer, tables[4, 1])  # (B, T, S)
    step = 1
    while step < t:  # host-known rounds; after each, frame i composes frames i - 2 step + 1 .. i
        table = torch.cat([table[:, :step], table[:, step:].gather(2, table[:, :-step])], dim=1)
        step *= 2
    # From the start state (label -1, length 0): a run of length 1 opens a segment (frame 0 always).
    return tables[5][table[:, :, 0]].cumsum(dim=1) - 1


def _states(t: int, device: torch.device) -> torch.Tensor:
    """``(6, (T + 1)^2)`` long tables over the states ``s`` of :func:`_relabel_scan`: the label
    before as ``(label + 1) m``; the label a relabelled frame takes when not the right one
    (the label before, label 0 in the start state), as ``(label + 1) m``; the length after a
    frame of the same label, capped at T; the length before; ``m`` and 1 (at ``[4, 0..1]``);
    whether the length is 1."""
    m = t + 1
    state = torch.arange(m * m, device=device)
    label_m, length = state // m * m, state % m
    base = torch.where(length > 0, label_m, m)
    constants = torch.zeros_like(state)
    constants[0] = m  # fills, not copies of host data (these may be made during a graph capture)
    constants[1] = 1
    return torch.stack([label_m, base, (length + 1).clamp(max=t), length, constants, (length == 1).long()])


def apportion(total: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Split ``total (B,)`` over groups in proportion to ``weights (B, G)`` (long, ``>= 0``) by
    largest remainders (ties: the lower group), exactly in integers: ``(B, G)`` shares summing
    to ``total``, each at most ``ceil(total * w / sum w)``; zero-weight groups get nothing.
    Needs ``total <= sum(weights)`` per row (or ``total == 0``)."""
    wsum = weights.sum(dim=1, keepdim=True).clamp(min=1)
    q = total.unsqueeze(1) * weights
    base = torch.div(q, wsum, rounding_mode="floor")
    rem = torch.remainder(q, wsum)  # q - base * wsum (q >= 0, wsum >= 1)
    left = total - base.sum(dim=1)
    return base + (stable_rank(rem, descending=True) < left.unsqueeze(1))
