"""``divprune``: greedy max-min diversity selection on cosine distance."""

from __future__ import annotations

import torch

from tokenreduce import Reducer, Stage, make_reduction, ops
from tokenreduce.numerics import safe_scale


def max_min_select(
    tokens: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min diversity selection (DivPrune's rule), batched.

    Args:
        tokens: ``(B, N, D)`` features.
        counts: ``(B,)`` how many tokens each row selects (``<=`` its valid count).
        valid: ``(B, N)`` validity; padded tokens are never selected nor used as distances.

    Returns:
        ``(picks (B, T), slots (B, T))``: selected indices in selection order (``-1`` at
        padded slots) and the slot mask.
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    t = int(counts.max())
    # Rows of extreme magnitude are first divided by a power of two (exact), so the squared
    # norms cannot overflow float32 (bfloat16 tokens near 1e19 and beyond would all
    # normalise to zero and every distance would tie).
    x = ops.normalize(safe_scale(tokens, valid)[0])
    dist = 1.0 - x @ x.transpose(1, 2)  # (B, N, N) cosine distance, float32
    pair_ok = valid.unsqueeze(2) & valid.unsqueeze(1)
    dist = dist.masked_fill(~pair_ok, float("inf"))
    # Step 0: the token whose nearest other token is farthest. As in the official code this
    # is the second smallest entry of its column, the smallest being its own (~0) distance.
    k = min(2, n)
    first_score = torch.topk(dist, k, dim=1, largest=False).values[:, k - 1, :]
    neg_inf = torch.tensor(float("-inf"), device=dev)
    picks = torch.full((b, t), -1, dtype=torch.long, device=dev)
    slots = ops.slot_mask(counts, t)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    min_dist = torch.full((b, n), float("inf"), device=dev)
    rows = torch.arange(b, device=dev)
    for step in range(t):  # one pick per step for every row at once
        score = first_score if step == 0 else min_dist
        # Selected tokens are excluded explicitly: the official code relies on their zero
        # self-distance, which fails only for exact duplicates.
        score = torch.where(valid & ~chosen, score, neg_inf)
        pick = score.argmax(dim=1)  # first index on ties
        active = slots[:, step]
        picks[:, step] = torch.where(active, pick, torch.full_like(pick, -1))
        chosen[rows, pick] |= active
        # Distance of every token to its nearest selected token (rows of the picked tokens).
        min_dist = torch.where(active[:, None], torch.minimum(min_dist, dist[rows, pick]), min_dist)
    return picks, slots


class DivPrune(Reducer):
    """DivPrune: keep the most diverse subset by greedy max-min selection on cosine distance.

    With ``d(i, j) = 1 - cos(x_i, x_j)``: the first token is the one whose nearest
    other token is farthest; each next token maximises its distance to the nearest
    already-selected token (a greedy solution of the Max-Min Diversity Problem), until
    ``T`` are selected (``T`` steps, vectorised over the batch, ``O(N^2)`` distances
    per row). Ties go to the lower index. Features are kept unchanged.
    ``info["selection_order"]`` lists the picks in the order they were made.

    Published setting: LLaVA-1.5, selection on the projected image tokens at the LLM
    input (``projector``), keeping 9.8% (``budget: 0.098``, 56 of 576). The rule only
    needs features, so ``vision_encoder`` and ``llm_layer`` work too.

    Counts: a ratio budget ``r`` keeps ``round(r * N)`` tokens with Python's ``round``
    (half to even, ``ratio_rounding = "half_even"``), as the official
    ``int(round(threshold_ratio * N))``: ratio 0.5 keeps 288 of 577 and 50 of 101
    (``0.5 * 101 = 50.5``). At least one token is kept, where the official count is 0
    for ``r * N < 0.5``.

    Stages: any.

    Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv:2503.02175.
    Official code: https://github.com/vbdi/divprune
    """

    name = "divprune"
    stages = frozenset(Stage)
    ratio_rounding = "half_even"  # official: int(round(threshold_ratio * N))
    paper = (
        'Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025, '
        "arXiv:2503.02175 (github.com/vbdi/divprune)"
    )

    def reduce(self, tokens, counts, valid, context):
        picks, slots = max_min_select(tokens, counts, valid)
        indices = ops.ascending(picks, slots)
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info={"selection_order": picks})
