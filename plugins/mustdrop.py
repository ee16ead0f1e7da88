"""``mustdrop``: multi-stage dropping, spatial window merging in the encoder and dual-attention filtering in the LLM."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from tokenreduce import AttentionRows, Reducer, ReducerParams, RequiresByStage, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError, MissingContextError
from tokenreduce.numerics import safe_scale, unscale
from tokenreduce.pipeline import Pipeline, Step

from .mustdrop_merge import plan_rounds, window_merge

#: Official pruning layers (``LlamaDynamicvitModel.pruning_layers``): the filter reads layer
#: K's attention and prunes its output, i.e. the input of layer K + 1 here.
OFFICIAL_PRUNING_LAYERS = (2, 6, 10, 14)
#: The example schedule (docs/examples/reducers/mustdrop.yaml), ending at 64 tokens.
EXAMPLE_ENCODER_BUDGET = 432
EXAMPLE_LLM_BUDGETS = (192, 128, 96, 64)

_LLM_NEEDS = (AttentionRows(query="text", layer="previous"),)


class MustDropParams(ReducerParams):
    window_size: int = Field(
        default=3,
        ge=2,
        description="vision_encoder: side of the merge windows in tokens (official 3, i.e. 3x3 windows on "
        "LLaVA's 24x24 grid). Ignored at llm_layer.",
    )
    global_thr: float = Field(
        default=0.011,
        gt=0.0,
        description="llm_layer: global-attention threshold, as a share of the image's total attention from the "
        "text tokens (official 64-token setting 0.011). With a budget only its ratio to individual_thr matters.",
    )
    individual_thr: float = Field(
        default=0.01,
        gt=0.0,
        description="llm_layer: individual-attention threshold on a text token's attention to an image token "
        "(official 64-token setting 0.01).",
    )


class MustDrop(Reducer):
    """MustDrop: merge similar neighbouring windows in the encoder, filter by text attention in the LLM.

    One reducer whose rule depends on the stage; the method is a multi-step pipeline
    (``docs/examples/reducers/mustdrop.yaml``, or :meth:`schedule`).

    ``vision_encoder`` (local spatial merging): the valid tokens form an ``h x w`` grid
    (``context.grid``, else a square), tiled by non-overlapping ``window_size`` squares.
    A window's score is the mean cosine similarity of its token pairs (self-pairs
    excluded); windows are merged by decreasing score, each averaged into its last
    (bottom-right) token, whose index it keeps; ``sizes`` count the merged tokens.

    ``llm_layer`` (dual-attention filtering): with ``A (Q, N)`` the head-averaged
    attention of the text tokens after the image to the image tokens (recomputed for
    those rows from layer ``K-1``'s q/k: ``AttentionRows(query="text",
    layer="previous")``), the official filter keeps a token when its global attention
    ``sum_q A[q, i]`` is at least ``global_thr`` times the image's total, or its
    individual attention ``max_q A[q, i]`` is at least ``individual_thr``. Here tokens
    are ranked by ``max(global share / global_thr, max_q A / individual_thr)`` and the
    top ``T`` kept: exactly the official rule with both thresholds scaled by the one
    factor that leaves ``T`` tokens. Official pruning after layers 2, 6, 10, 14 is
    steps at layers 3, 7, 11, 15 here.

    Context: ``llm_layer`` needs ``attention`` (``text_mask`` marks the real text rows);
    ``vision_encoder`` needs only ``grid`` when a row's tokens are not a square, so it
    also runs on towers without [CLS] (Qwen2-VL / Qwen2.5-VL).

    Deviations from the official code (liuting20/MustDrop):

    * Budgets, not thresholds: the official encoder merges every window whose score is
      at least 0.8 (the smallest such count over the batch) and the LLM filter keeps
      whatever passes its thresholds, so counts vary per image. Here each step keeps
      its budget. The encoder follows LightCompress (``fix_r = (N - T) // (k^2 - 1)``
      windows); when ``N - T`` is not a multiple of ``k^2 - 1`` the next window merges
      only its tokens most similar to its last token, and below one token per window
      every window is merged and the rule repeats on the grid of windows (the
      official code has neither case). Windows cut by the grid edge are smaller.
    * Where: the official merge runs after the first ViT layer, so the later 23 layers
      see fewer tokens; ``vision_encoder`` here is the selected layer's output.
    * Key token set: the official encoder also keeps the top ``ceil(0.08 N)`` tokens by
      the last layer's [CLS] attention and adds them back after every LLM filter.
      Steps do not share state and the decoder context has no [CLS] attention, so
      this protection is not applied.
    * Decoding stage: after the prefill the official code cuts the KV caches of layers
      2..14 down to the tokens the last filter kept. The decoder adapter keeps each
      layer's cache as that layer saw the sequence, so this is not reproduced.
    * Ties go to the lower index (stable sorts); similarities in float32.

    The window plan (how many merges per round) is made on the host: without a mask
    (LLaVA adapters) from the known sizes, with a mask from the valid counts (one read).

    Stages: ``vision_encoder``, ``llm_layer``.

    Paper: Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
    Large Language Model", arXiv:2411.10803 (2024).
    Official code: https://github.com/liuting20/MustDrop
    """

    name = "mustdrop"
    stages = frozenset({Stage.VISION_ENCODER, Stage.LLM_LAYER})
    Params = MustDropParams
    # The window merge needs nothing beyond the tokens; the decoder filter reads attention.
    requires = RequiresByStage({Stage.LLM_LAYER: _LLM_NEEDS}, unset=Stage.VISION_ENCODER)
    # Without a mask the window plan comes from host-known sizes: no device read.
    graph_safe = True
    paper = (
        'Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model", '
        "arXiv:2411.10803 (github.com/liuting20/MustDrop)"
    )

    def reduce(self, tokens, counts, valid, context):
        if context.stage is Stage.LLM_LAYER:
            return self._filter(tokens, counts, valid, context)
        return self._merge(tokens, counts, valid, context)

    # -- vision_encoder: local spatial merging ----------------------------------------------

    def _grid(self, n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is not None and grid[0] * grid[1] == n:
            return grid
        side = math.isqrt(n)
        if side * side != n:
            raise InvalidInputError(
                f"mustdrop at vision_encoder merges grid windows: it needs context.grid=(h, w) with h * w equal to "
                f"a row's valid tokens, or a square count; got {n} tokens and grid={grid}"
            )
        return side, side

    def _merge(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        k = self.params.window_size
        if context.uniform_count is not None:
            rows = [(n, context.uniform_count)] * b
        else:
            rows = list(zip(valid.sum(dim=1).tolist(), counts.tolist()))  # one read with a padding mask
        plans = [plan_rounds(nv, t, *self._grid(nv, context.grid), k) if nv else [(1, 1, 0)] for nv, t in rows]
        # Rows of huge (or tiny) magnitude are scaled by a power of two: means and cosine
        # similarities are unchanged, and float32 sums cannot overflow.
        x, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)  # no padding: no mask
        owner, rep = window_merge(x, valid, plans, k, dense=context.uniform_count is not None)

        # Kept: the representatives of non-empty groups, in position order.
        t = max(t for _, t in rows)
        g = rep.shape[1]
        size = torch.zeros(b, g + 1, device=tokens.device).scatter_add_(
            1, torch.where(owner >= 0, owner, g), valid.float()
        )[:, :g]
        positions = torch.where(size > 0, rep, n)
        by_pos = torch.sort(positions, dim=1)
        slots = ops.slot_mask(counts, t)
        indices = by_pos.values[:, :t].masked_fill(~slots, -1)
        # Each group's output slot (its rank by position), then each token's.
        slot_of = torch.empty_like(by_pos.indices).scatter_(
            1, by_pos.indices, torch.arange(g, device=tokens.device).expand(b, g)
        )
        assign = torch.where(owner >= 0, slot_of.gather(1, owner.clamp(min=0)), owner)
        sums, sizes = ops.merge_into(x, assign, t)
        features = unscale(sums / sizes.clamp(min=1).unsqueeze(-1), scale, tokens.dtype)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info={"assignment": assign})

    # -- llm_layer: dual-attention filtering -------------------------------------------------

    def scores(self, tokens, valid, context) -> torch.Tensor:
        """``(B, N)`` ``max(global share / global_thr, individual / individual_thr)``."""
        b, n, _ = tokens.shape
        att = context.attention
        if att is None:
            raise MissingContextError(
                "reducer 'mustdrop' at llm_layer needs context attention; run it through an adapter or pass "
                "context=ReductionContext(attention=...)"
            )
        if att.dim() != 3 or att.shape[0] != b or att.shape[2] != n or att.shape[1] < 1:
            raise InvalidInputError(
                f"mustdrop: context.attention must have shape (B, Q, N)=({b}, Q>=1, {n}), got {tuple(att.shape)}"
            )
        att = att.float().to(tokens.device)
        rows = torch.ones(att.shape[:2], dtype=torch.bool, device=tokens.device)
        if context.text_mask is not None and tuple(context.text_mask.shape) == tuple(att.shape[:2]):
            rows = context.text_mask.to(tokens.device).bool()
        att = att.masked_fill(~rows.unsqueeze(-1) | ~valid.unsqueeze(1), 0.0)
        glob = att.sum(dim=1)
        share = glob / glob.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        individual = att.amax(dim=1)  # attention is >= 0, so the zeroed rows never win
        return torch.maximum(share / self.params.global_thr, individual / self.params.individual_thr)

    def _filter(self, tokens, counts, valid, context):
        score = self.scores(tokens, valid, context)
        order, slots = ops.topk_per_row(score, counts, valid, context.uniform_count)
        indices = ops.ascending(order, slots)
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info={"scores": score})

    # -- the multi-step form ------------------------------------------------------------------

    @classmethod
    def schedule(
        cls,
        encoder_budget: int | float = EXAMPLE_ENCODER_BUDGET,
        layers: Sequence[int] = tuple(k + 1 for k in OFFICIAL_PRUNING_LAYERS),
        budgets: Sequence[int | float] = EXAMPLE_LLM_BUDGETS,
        **params: Any,
    ) -> Pipeline:
        """The multi-stage pipeline: one ``vision_encoder`` merge step, then one filter step per layer."""
        if len(layers) != len(budgets):
            raise InvalidInputError(f"mustdrop.schedule: {len(layers)} layers but {len(budgets)} budgets")
        steps = [Step(Stage.VISION_ENCODER, cls(encoder_budget, stage=Stage.VISION_ENCODER, **params))]
        for k, t in zip(layers, budgets):
            steps.append(Step(Stage.LLM_LAYER, cls(t, stage=Stage.LLM_LAYER, **params), layer=k))
        return Pipeline(steps)
