"""``divprune``: greedy max-min diversity selection on cosine distance."""

from __future__ import annotations

import torch

from tokenreduce import Reducer, Stage, make_reduction, ops
from tokenreduce.numerics import safe_scale

from . import kernels


@torch.no_grad()  # picks are indices, never differentiated; the kept features are gathered from the input
def max_min_select(
    tokens: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min diversity selection (DivPrune's rule), batched.

    Args:
        tokens: ``(B, N, D)`` features.
        counts: ``(B,)`` how many tokens each row selects (``<=`` its valid count).
        valid: ``(B, N)`` validity; padded tokens are never selected nor used as distances.
        t: ``counts.max()`` when known on the host (no device read then).

    Returns:
        ``(picks (B, T), slots (B, T))``: selected indices in selection order (``-1`` at
        padded slots) and the slot mask.
    """
    b, n, _ = tokens.shape
    t = int(counts.max()) if t is None else t
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
    # Selected tokens are excluded explicitly: the official code relies on their zero
    # self-distance, which fails only for exact duplicates. With the diagonal at -inf, the
    # row of a pick carries its own exclusion: score = min(score, dist[pick]) is then both
    # the update of every token's distance to its nearest pick and the pick's removal.
    dist.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    pick = torch.where(valid, first_score, float("-inf")).argmax(dim=1)  # first index on ties
    # score[j]: distance of token j to its nearest pick so far, -inf for picks and padding
    # (exactly the official code's masked minimum distance, one elementwise minimum per step).
    score = torch.full((b, n), float("inf"), device=tokens.device).masked_fill(~valid, float("-inf"))
    # On CUDA the t - 1 steps below run as one fused Triton kernel (same minimum and argmax,
    # so the same picks bit for bit); None where it does not apply.
    chosen = None
    if kernels.fused_wanted(dist):
        chosen = kernels.greedy_module().max_min_fused(dist, pick, score, t)  # type: ignore[union-attr]
    if chosen is None:
        picks = [pick]
        # t steps, a host-known count, and no step reads the device: three kernels per step
        # (gather the pick's row, minimum, argmax), capturable in a CUDA graph. A row past its
        # count keeps picking (it only ever sees -inf or distances of its own row); its extra
        # picks are masked at the end, so the rows stay independent.
        for _ in range(t - 1):
            row = dist.gather(1, pick.view(b, 1, 1).expand(b, 1, n)).squeeze(1)
            torch.minimum(score, row, out=score)
            pick = score.argmax(dim=1)
            picks.append(pick)
        chosen = torch.stack(picks, dim=1)
    slots = ops.slot_mask(counts, t)
    return chosen.masked_fill(~slots, -1), slots


class DivPrune(Reducer):
    """DivPrune: keep the most diverse subset by greedy max-min selection on cosine distance.

    With ``d(i, j) = 1 - cos(x_i, x_j)``: the first token is the one whose nearest
    other token is farthest; each next token maximises its distance to the nearest
    already-selected token (a greedy solution of the Max-Min Diversity Problem), until
    ``T`` are selected (``T`` steps, vectorised over the batch, ``O(N^2)`` distances
    per row). Ties go to the lower index. Features are kept unchanged.
    ``info["selection_order"]`` lists the picks in the order they were made.

    On CUDA, with Triton installed (and ``TOKENREDUCE_NO_TRITON`` unset), the greedy loop
    runs as one fused Triton kernel, one program per row. The loop only takes minima and
    argmaxes of the distances torch computes (no sums), so its picks equal the torch
    loop's (used on CPU) bit for bit.

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
    graph_safe = True
    ratio_rounding = "half_even"  # official: int(round(threshold_ratio * N))
    paper = (
        'Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025, '
        "arXiv:2503.02175 (github.com/vbdi/divprune)"
    )

    def reduce(self, tokens, counts, valid, context):
        picks, slots = max_min_select(tokens, counts, valid, context.uniform_count)
        indices = ops.ascending(picks, slots)
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info={"selection_order": picks})
