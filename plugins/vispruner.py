"""``vispruner``: important tokens by [CLS] attention, then diverse tokens by iterative duplicate removal."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tokenreduce import CLS_ATTENTION, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.numerics import safe_scale

from . import kernels
from .cls_attn import cls_scores

#: Tokens removed per matching round in the official code (``r = min(8, R - T_div)``).
ROUND_SIZE = 8


class VisPrunerParams(ReducerParams):
    important_ratio: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the budget T kept as important tokens: T_imp = floor(T * ratio), the other "
        "T - T_imp are diverse. Default 0.5 (the official default; the official README's MME example uses 0.75 at 64).",
    )


def _round_sizes(residual: int, diverse: int) -> list[int]:
    """Tokens removed in each matching round for one row (host integers)."""
    sizes = []
    while diverse > 0 and residual > diverse:
        # Official: min(8, R - T_div). The ceil(R/2) cap only binds for R < 16, where the
        # official indexing fails; it keeps a round from dropping more "a" tokens than exist.
        r = min(ROUND_SIZE, residual - diverse, (residual + 1) // 2)
        sizes.append(r)
        residual -= r
    return sizes


class VisPruner(Reducer):
    """VisPruner: keep the important tokens by [CLS] attention, then diverse tokens among the rest.

    With budget ``T`` split into ``T_imp = floor(T * important_ratio)`` important and
    ``T_div = T - T_imp`` diverse tokens (official default ratio 0.5):

    1. Important: the ``T_imp`` patches with the highest ``context.cls_attention``
       (the [CLS] attention of the selected vision layer, averaged over heads).
    2. Diverse: the other patches, ordered by decreasing [CLS] attention, are thinned
       by rounds of matching, as in the official code: the current list is split
       alternately into ``a`` (even places) and ``b`` (odd places); each ``a`` token
       scores its highest cosine similarity to any ``b`` token; the ``r = min(8,
       R - T_div)`` most duplicated ``a`` tokens are removed and the list becomes
       ``[remaining a by decreasing score, b in order]``, until ``T_div`` remain.

    Features are kept unchanged; indices are returned in position order.
    ``info["important"]`` marks the important tokens, ``info["scores"]`` holds the
    [CLS] attention.

    Deviations from the official code (Theia-4869/VisPruner, ``encode_images``): ties in
    the [CLS] attention and in the match scores go to the lower index / earlier place
    (stable sorts). The official ``argsort`` is not stable, and since the kept ``a``
    tokens are re-listed by score, the order it gives tied scores changes the a/b split
    of every later round; ties are rare in float32 but common in float16, where the
    official code's picks depend on torch's sort implementation. Similarities are
    computed once per image in float32 and gathered per round (the official code
    recomputes ``a @ b.T`` in the model dtype). When a round starts from an odd number
    ``R`` of remaining tokens, the official indexing raises a shape error; here ``a``
    holds the ``ceil(R/2)`` tokens at even places and a round removes at most that many
    (only binding when ``R < 16``).

    On CUDA, with Triton installed (and ``TOKENREDUCE_NO_TRITON`` unset), all matching
    rounds run as one fused Triton kernel, one program per row
    (:mod:`tokenreduce_plugins.kernels.matching`). It takes the same maxima of the same
    float32 similarities as the torch loop (used on CPU) and orders them as its stable
    descending sort does (ties to the earlier place, -0.0 equal to +0.0, NaN first), with
    no arithmetic of its own, so it keeps the same tokens: no deviation. Without a mask,
    where every round's size is known on the host, each round instead runs as two launches
    spread over many programs (:mod:`tokenreduce_plugins.kernels.matching_rounds`: the
    scores, then the new list), with the same maxima and order.

    Host synchronisation: for the torch loop the number of rounds is worked out on the
    host. Without a mask (as the LLaVA adapters call it) every row keeps the same known
    count, so no device value is read; with a padding mask the valid counts are read once
    (the fused kernel needs no plan: each row loops on the device until it is done). The
    Python loop runs over that fixed number of rounds, each batched over rows.

    Published stage: ``vision_encoder``: the official code selects on the selected
    vision layer's patch features (no [CLS]; the budget counts patches) and drops the
    tokens after LLaVA's per-token projector, which keeps the same tokens. At
    ``projector`` the same rule runs on the projected features. LightCompress runs the
    same selection code for LLaVA (its budget is ``round(N * (1 - prune_ratio))``).

    Models without a [CLS] token (Qwen2-VL / Qwen2.5-VL, SigLIP towers) have no
    ``cls_attention``: the adapter rejects the pipeline when it is patched, naming the
    missing context. (LightCompress substitutes the vision encoder's mean attention
    for Qwen2.5-VL; that variant is not implemented here.)

    Stages: ``vision_encoder``, ``projector``.

    Paper: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
    Effective Token Pruning in VLMs", ICCV 2025, arXiv:2412.01818.
    Official code: https://github.com/Theia-4869/VisPruner
    """

    name = "vispruner"
    stages = frozenset({Stage.VISION_ENCODER, Stage.PROJECTOR})
    Params = VisPrunerParams
    requires = (CLS_ATTENTION,)
    # Without a mask the rounds are planned from host-known counts (_round_sizes): no device read.
    graph_safe = True
    paper = (
        'Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", '
        "ICCV 2025, arXiv:2412.01818 (github.com/Theia-4869/VisPruner)"
    )

    def split(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(important, diverse)`` counts ``(B,)`` for per-row budgets ``counts``."""
        # Official: int(T * r), i.e. a float64 product truncated.
        important = torch.floor(counts.double() * self.params.important_ratio).long()
        return important, counts - important

    def _rounds(self, counts, valid) -> list[int]:
        """Per round, the largest count any row removes (host integers; only the round count matters).

        For padded batches: reads the valid counts and budgets once."""
        pairs = set(zip(valid.sum(dim=1).tolist(), counts.tolist()))
        plans = []
        for n, t in pairs:
            imp = math.floor(t * self.params.important_ratio)
            plans.append(_round_sizes(n - imp, t - imp))
        depth = max((len(p) for p in plans), default=0)
        return [max((p[i] for p in plans if i < len(p)), default=0) for i in range(depth)]

    def reduce(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        dev = tokens.device
        scores = cls_scores(context.cls_attention, tokens, self.name)
        n_imp, n_div = self.split(counts)
        n_valid = valid.sum(dim=1)

        # Valid tokens by decreasing [CLS] attention (stable: ties to the lower index).
        order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
        place = torch.arange(n, device=dev).expand(b, n)
        important = ops.keep_mask_from(order, place < n_imp[:, None], n)

        # Scaled by a power of two where the magnitude is extreme, so norms cannot overflow.
        x = ops.normalize(safe_scale(tokens, valid)[0])
        sim = x @ x.transpose(1, 2)  # (B, N, N) cosine similarity, float32
        t = context.uniform_count
        if t is not None:
            # Every row holds n tokens and keeps t: the residual list is order[T_imp:] with no
            # padding, and every round's size is known here, so the list is kept exactly as
            # long as it is (six kernels a round instead of forty).
            imp = math.floor(t * self.params.important_ratio)
            residual = order[:, imp:]
            sizes = _round_sizes(n - imp, t - imp)
            fused = None
            if sizes:  # the parallel rounds where they run, else the one-program kernel, else the loop
                fused = _fused_uniform(sim, residual, sizes)
                if fused is None:
                    fused = _fused_rounds(sim, residual, n - imp, t - imp)
            if fused is not None:
                residual = fused[:, : t - imp]  # the rest is the -1 the list shrank by
            else:
                rows = torch.arange(b, device=dev).view(-1, 1, 1)  # made once, indexes every round
                for r in sizes:
                    residual = _match_round_dense(sim, residual, r, rows)
            diverse = ops.keep_mask_from(residual, torch.ones_like(residual, dtype=torch.bool), n) if t > imp else None
        else:
            # Residual list: order[T_imp:], in the same (attention) order, -1 padded.
            rem = n_valid - n_imp
            residual = order.gather(1, (place + n_imp[:, None]).clamp(max=n - 1)).masked_fill(place >= rem[:, None], -1)
            fused = _fused_rounds(sim, residual, rem, n_div)
            if fused is not None:
                residual = fused
            else:
                # A fixed, host-known number of rounds, each batched over rows, none reading the device.
                for _ in self._rounds(counts, valid):
                    residual, rem = _match_round(sim, residual, rem, n_div)
            diverse = ops.keep_mask_from(residual, (residual >= 0) & (n_div > 0)[:, None], n)
            t = int(counts.max())

        # Official: with T_div = 0 only the important tokens are kept (no residual).
        kept = important if diverse is None else important | diverse
        slots = ops.slot_mask(counts, t)
        positions = torch.where(kept, torch.arange(n, device=dev), n)
        indices = torch.sort(positions, dim=1).values[:, :t].masked_fill(~slots, -1)
        return make_reduction(
            tokens, indices, slots, sizes=slots.float(), info={"scores": scores, "important": important}
        )


def _fused_uniform(sim: torch.Tensor, residual: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """The uniform case's rounds as two parallel Triton launches a round (every round's size is
    known here), or ``None`` (CPU, no Triton, disabled, or ``matching_rounds.ENABLED`` off)."""
    if not kernels.fused_wanted(sim):
        return None
    from .kernels import matching_rounds  # imports Triton: only reached on CUDA with Triton installed

    if not matching_rounds.ENABLED:
        return None
    return matching_rounds.match_rounds_uniform(sim, residual, sizes)


def _fused_rounds(
    sim: torch.Tensor, residual: torch.Tensor, remaining: torch.Tensor | int, diverse: torch.Tensor | int
) -> torch.Tensor | None:
    """Every round at once, as one Triton kernel (CUDA, Triton, not disabled), or ``None``: then
    the torch loop runs. The final list holds the loop's tokens (a padded row that is done
    is not reordered further by the loop's empty rounds, which only the loop runs)."""
    if not kernels.fused_wanted(sim):
        return None
    from .kernels import matching  # imports Triton: only reached on CUDA with Triton installed

    return matching.match_rounds(sim, residual, remaining, diverse, ROUND_SIZE)


def _match_round_dense(sim: torch.Tensor, residual: torch.Tensor, r: int, rows: torch.Tensor) -> torch.Tensor:
    """:func:`_match_round` for rows whose lists are all real and equally long, removing ``r``.

    The same similarities, maxima and stable sort as the padded form (its padding only
    adds -inf entries that sort last), so the same list, without the padding arithmetic.
    """
    a, bb = residual[:, 0::2], residual[:, 1::2]  # a round runs with >= 2 entries: bb is not empty
    # sim[b, a_i, b_j] in one indexing kernel, (B, Na, Nb), not a (B, Na, N) gather and then a second
    # (``rows``: arange(B) as (B, 1, 1)).
    s = sim[rows, a.unsqueeze(2), bb.unsqueeze(1)].amax(dim=2)  # best match of each a
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    return torch.cat([a.gather(1, by_score)[:, r:], bb], dim=1)


def _match_round(
    sim: torch.Tensor, residual: torch.Tensor, rem: torch.Tensor, diverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of the official matching and pruning, for every row at once.

    ``residual (B, W)`` lists each row's remaining candidates in their current order
    (``rem[b]`` of them, then -1); rows with ``rem <= diverse`` are left unchanged.
    """
    b, w = residual.shape
    dev = residual.device
    r = torch.minimum(torch.minimum((rem - diverse).clamp(min=0), (rem + 1) // 2), torch.full_like(rem, ROUND_SIZE))
    r = torch.where(diverse > 0, r, torch.zeros_like(r))
    a, bb = residual[:, 0::2], residual[:, 1::2]
    place = torch.arange(w, device=dev)
    a_ok, b_ok = place[0::2] < rem[:, None], place[1::2] < rem[:, None]
    # scores[i] = max_j cos(a_i, b_j), gathered from the per-image similarity matrix.
    s = ops.gather_rows(sim, a)  # (B, Na, N)
    s = torch.gather(s, 2, bb.clamp(min=0).unsqueeze(1).expand(-1, a.shape[1], -1))
    s = s.masked_fill(~b_ok.unsqueeze(1), float("-inf")).amax(dim=2)
    s = s.masked_fill(~a_ok, float("-inf"))  # padding sorts last (after every real a)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    a_sorted = a.gather(1, by_score)
    n_a = (rem + 1) // 2
    n_b = rem // 2
    # New list: [a by decreasing score, minus the first r; b in order]; a spare column w
    # absorbs the dropped and padded entries.
    ja = torch.arange(a.shape[1], device=dev).expand_as(a)
    jb = torch.arange(bb.shape[1], device=dev).expand_as(bb)
    keep_a = (ja >= r[:, None]) & (ja < n_a[:, None])
    to_a = torch.where(keep_a, ja - r[:, None], w)
    to_b = torch.where(jb < n_b[:, None], n_a[:, None] - r[:, None] + jb, w)
    out = torch.full((b, w + 1), -1, dtype=residual.dtype, device=dev)
    out.scatter_(1, to_a, a_sorted)
    out.scatter_(1, to_b, bb)
    # Entries routed to the spare column collide there; it is cut off.
    return out[:, :w], rem - r
