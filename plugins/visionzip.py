"""``visionzip``: dominant tokens by [CLS] attention plus contextual tokens merged on key similarity."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tokenreduce import CLS_ATTENTION, KEYS, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale, unscale

from .cls_attn import cls_scores

#: Published split for LLaVA-1.5: 54 dominant + 10 contextual of 64 (also 108+20 of 128,
#: 162+30 of 192), i.e. 10/64 of the budget is contextual.
PUBLISHED_CONTEXTUAL_RATIO = 10 / 64


class VisionZipParams(ReducerParams):
    contextual_ratio: float = Field(
        default=PUBLISHED_CONTEXTUAL_RATIO,
        ge=0.0,
        le=1.0,
        description="Share of the budget T given to contextual (merged) tokens: C = floor(T * ratio + 0.5); "
        "the other T - C are dominant. Default 10/64 reproduces the published 54+10, 108+20, 162+30 splits.",
    )
    contextual: int | None = Field(
        default=None,
        ge=0,
        description="Absolute number of contextual tokens (overrides contextual_ratio; capped at T).",
    )


class VisionZip(Reducer):
    """VisionZip: keep the dominant tokens by [CLS] attention, merge the rest into a few contextual tokens.

    With budget ``T`` split into ``D`` dominant and ``C`` contextual tokens
    (``C = floor(T * contextual_ratio + 0.5)``, ``D = T - C``; published 54+10 for 64):

    1. Dominant: the ``D`` patches with the highest ``context.cls_attention`` (the
       [CLS] attention of the selected vision layer, head-averaged) are kept unchanged.
    2. Contextual: the ``M`` remaining patches, in position order, are split into ``C``
       targets taken at a uniform stride (``step = max(1, M // C)``, targets at
       ranks ``0, step, 2*step, ...``) and the others; each other patch goes to the
       target whose key (``context.keys``, the selected layer's keys averaged over
       heads) is most cosine-similar. A contextual token is, as in the official code,
       the target's feature *plus* the mean of the features merged into it (the
       target alone if none was). ``sizes`` counts the target and its merged tokens.

    Budget mapping: the official code counts the vision [CLS] token among the dominant
    tokens (``visionzip(dominant=54)`` keeps [CLS] + 53 patches). Here only patch
    tokens are reduced, so ``T = 64`` gives 54 dominant patches + 10 contextual
    tokens: the same 64 tokens reach the LLM, one more patch in place of [CLS]. Set
    ``contextual`` to fix ``C`` exactly (``T=63, contextual=10`` is the official
    ``dominant=54, contextual=10`` without [CLS]). Kept tokens are returned in
    position order (the official code puts all dominant tokens before the
    contextual ones).

    On CUDA the key similarities come from one product divided by the norms
    (:func:`tokenreduce.ops.cosine_similarity`) and the merge sums from a one-hot product,
    both in TF32 (:mod:`tokenreduce.precision`): equal up to float32 rounding, so a token
    nearly equidistant from two targets may join the other one.

    Published stage: ``vision_encoder`` (features of the selected layer, merged before
    the projector). At ``projector`` the same selection is applied to projected
    features, so merging happens in the LLM width.

    Models without a [CLS] token (Qwen2-VL / Qwen2.5-VL) have no ``cls_attention``: the
    adapter rejects the pipeline when it is patched, naming the missing context.

    Stages: ``vision_encoder``, ``projector``.

    Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
    Language Models", CVPR 2025, arXiv:2412.04467.
    Official code: https://github.com/dvlab-research/VisionZip
    """

    name = "visionzip"
    stages = frozenset({Stage.VISION_ENCODER, Stage.PROJECTOR})
    Params = VisionZipParams
    requires = (CLS_ATTENTION, KEYS)
    # Without a mask the dominant/contextual split is worked out on the host: no device read.
    graph_safe = True
    paper = (
        'Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025, '
        "arXiv:2412.04467 (github.com/dvlab-research/VisionZip)"
    )

    def split(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dominant, contextual)`` counts ``(B,)`` for per-row budgets ``counts``."""
        if self.params.contextual is not None:
            contextual = counts.clamp(max=self.params.contextual)
        else:
            contextual = torch.floor(counts.double() * self.params.contextual_ratio + 0.5).long().clamp(max=counts)
        return counts - contextual, contextual

    def contextual_count(self, t: int) -> int:
        """``C`` for a budget ``t``: the host twin of :meth:`split` (the same float64 arithmetic)."""
        if self.params.contextual is not None:
            return min(t, self.params.contextual)
        return min(t, math.floor(t * self.params.contextual_ratio + 0.5))

    def reduce(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        keys = context.keys
        if keys.dim() != 3 or tuple(keys.shape[:2]) != (b, n):
            raise InvalidInputError(
                f"{self.name}: context.keys must have shape (B, N, D_k)=({b}, {n}, D_k), got {tuple(keys.shape)}"
            )
        scores = cls_scores(context.cls_attention, tokens, self.name)
        n_dom, n_ctx = self.split(counts)
        if context.uniform_count is not None:  # every row's split, known on the host
            t = context.uniform_count
            c_max = self.contextual_count(t)
            d_max = t - c_max
        else:
            t, c_max, d_max = int(counts.max()), int(n_ctx.max()), int(n_dom.max())

        # 1. Dominant tokens: top-D by [CLS] attention.
        order, slots = ops.topk_per_row(scores, n_dom, valid, d_max)
        dominant = ops.keep_mask_from(order, slots, n)

        # 2. Contextual targets at a uniform stride over the remaining tokens, in order.
        rest = valid & ~dominant
        rank = rest.long().cumsum(dim=1) - 1
        step = (rest.sum(dim=1) // n_ctx.clamp(min=1)).clamp(min=1)[:, None]
        target = rest & (rank % step == 0) & (rank // step < n_ctx[:, None])
        target_id = torch.where(target, rank // step, torch.full_like(rank, -1))  # 0..C-1, in order

        sizes = valid.float()
        merged_into = torch.full_like(rank, -1)
        contextual = None
        if c_max > 0:
            # Target keys as (B, C, Dk): scatter each target's position into its slot.
            pos = torch.arange(n, device=tokens.device).expand(b, n)
            tpos = torch.zeros(b, c_max + 1, dtype=torch.long, device=tokens.device)
            tpos.scatter_(1, torch.where(target, target_id, c_max), pos)
            tpos = tpos[:, :c_max]
            slot_ok = ops.slot_mask(n_ctx, c_max)
            sim = ops.cosine_similarity(keys.to(tokens.device), ops.gather_rows(keys.to(tokens.device), tpos))
            nearest = sim.masked_fill(~slot_ok[:, None, :], float("-inf")).argmax(dim=2)
            others = rest & ~target & (n_ctx[:, None] > 0)
            assign = torch.where(others, nearest, torch.full_like(nearest, -1))
            # Sums on rows rescaled by a power of two (exact), so bfloat16 tokens near 1e38
            # cannot overflow float32; the result is saturated to the output dtype.
            xs, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)
            sums, merged = ops.merge_into(xs, assign, c_max)
            # Official rule: contextual = target feature + mean of the tokens merged into it,
            # computed for the C targets only, (B, C, D), not for all (B, N, D) tokens.
            agg = sums / merged.clamp(min=1).unsqueeze(-1)
            contextual = unscale(ops.gather_rows(xs, tpos) + agg, scale, tokens.dtype)
            tid = target_id.clamp(min=0)
            sizes = torch.where(target, 1.0 + merged.gather(1, tid), sizes)
            merged_into = torch.where(assign >= 0, tpos.gather(1, assign.clamp(min=0)), merged_into)

        kept = dominant | target
        slots = ops.slot_mask(counts, t)
        positions = torch.where(kept, torch.arange(n, device=tokens.device), n)  # dropped sort last
        indices = torch.sort(positions, dim=1).values[:, :t].masked_fill(~slots, -1)
        # Kept tokens as they are (widening is exact), contextual slots from their (B, C, D) values.
        features = ops.gather_rows(tokens, indices).float()
        if contextual is not None:
            at = indices.clamp(min=0)
            slot_value = ops.gather_rows(contextual, target_id.gather(1, at).clamp(min=0))
            features = torch.where(target.gather(1, at).unsqueeze(-1), slot_value, features)
        info = {"scores": scores, "dominant": dominant, "contextual": target, "merged_into": merged_into}
        return make_reduction(
            tokens,
            indices,
            slots,
            features=features,
            sizes=ops.gather_rows(sizes, indices),
            info=info,
        )
