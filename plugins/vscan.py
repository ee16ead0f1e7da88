"""``vscan``: global + local [CLS]-attention scans with merging in the encoder, then pruning inside the LLM."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from tokenreduce import (
    CLS_ATTENTION,
    AttentionRows,
    Reducer,
    ReducerParams,
    RequiresByStage,
    Stage,
    make_reduction,
    merge_nearest,
    ops,
)
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError, MissingContextError
from tokenreduce.numerics import safe_scale, unscale

from .cls_attn import cls_scores
from .fastv import attention_scores

#: ``context.extra`` key of the local scan's signal: ``(B, N)`` head-averaged [CLS] attention
#: of a shallow encoder layer (official LLaVA code: ``attentions[5]``, the 6th of 24 layers).
SHALLOW_KEY = "shallow_cls_attention"

#: The published LLaVA-1.5 setting for an average of 64 tokens: 96 after the encoder,
#: 32 from decoder layer 16 on (README and scripts/llava1_5/*.sh).
PUBLISHED_ENCODER_BUDGET = 96
PUBLISHED_LLM_LAYER = 16
PUBLISHED_LLM_BUDGET = 32

_ENCODER_NEEDS = (CLS_ATTENTION,)
_LLM_NEEDS = (AttentionRows(query="last", layer="current"),)


class VScanParams(ReducerParams):
    local_ratio: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Encoder stages: share of the budget T taken by the local scan, L = floor(T * local_ratio) "
        "(official: 1 - global_ratio = 0.5); the global scan takes the other T - L. Ignored at llm_layer.",
    )
    window_size: int = Field(
        default=6,
        ge=1,
        description="Encoder stages: side of the local-scan windows in tokens (published: 6 on LLaVA's 24x24 grid, "
        "i.e. 4x4 windows; the Qwen2.5-VL code uses 4). Rows/columns left over join the last window. "
        "Ignored at llm_layer.",
    )
    merge: bool = Field(
        default=True,
        description="Encoder stages: average every dropped token into its most cosine-similar kept token "
        "(published); False drops them. Ignored at llm_layer, where the official code drops.",
    )


def window_ids(
    n: int, grid: tuple[int, int] | None, window_size: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """``(window (N,), number of windows)`` of each token position in a row of ``n``.

    Windows tile the ``(h, w)`` grid in ``window_size`` squares; the rows and columns that
    do not fill a whole window join the last one (the official Qwen2.5-VL rule; LLaVA's
    24x24 grid with 6x6 windows has none). Without a grid, ``n`` tokens form a square grid
    when ``n`` is a square, else one row cut into runs of ``window_size**2`` tokens.
    """
    if grid is not None:
        h, w = grid
        if h < 1 or w < 1 or h * w != n:
            raise InvalidInputError(f"vscan: context.grid must be (h, w) with h * w == N={n}, got {tuple(grid)}")
        wh = ww = window_size
    else:
        side = math.isqrt(n)
        if side * side == n:
            h = w = side
            wh = ww = window_size
        else:
            h, w, wh, ww = 1, n, 1, window_size * window_size
    nh, nw = max(1, h // wh), max(1, w // ww)
    pos = torch.arange(n, device=device)
    row = torch.clamp(pos // w // wh, max=nh - 1)
    col = torch.clamp(pos % w // ww, max=nw - 1)
    return row * nw + col, nh * nw


def rank_in_window(scores: torch.Tensor, window: torch.Tensor, valid: torch.Tensor, n_windows: int) -> torch.Tensor:
    """``(B, N)`` rank of each valid token among the valid tokens of its window by descending
    score (0 = the window's best; ties to the lower index). Padded tokens rank ``N``.

    Two stable sorts: by score, then by window, group each window's tokens in score order;
    a token's rank is its offset from the start of its group. No loop over windows.
    """
    b, n = scores.shape
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    win = torch.where(valid, window.expand(b, n), n_windows).gather(1, order)  # padding: a spare window, last
    by_window = torch.sort(win, dim=1, stable=True)
    pos = torch.arange(n, device=scores.device).expand(b, n)
    first = torch.ones_like(valid)
    first[:, 1:] = by_window.values[:, 1:] != by_window.values[:, :-1]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    rank_sorted = pos - start
    # Back from window order to score order, then from score order to token positions.
    rank_score_order = torch.empty_like(rank_sorted).scatter_(1, by_window.indices, rank_sorted)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_score_order)
    return rank.masked_fill(~valid, n)


class VScan(Reducer):
    """VScan: global + local [CLS]-attention scans and merging in the encoder, then text-guided pruning in the LLM.

    A two-stage method; one class handles both stages, chosen by the step's stage (see
    ``docs/examples/reducers/vscan.yaml``; published LLaVA-1.5 setting for an average
    of 64 tokens: 96 tokens after the encoder, 32 from decoder layer 16 on).

    **Encoder side** (``projector``, published; or ``vision_encoder``), budget ``T``:

    1. Local scan: ``L = floor(T * local_ratio)`` tokens (published ``0.5``), spread over
       non-overlapping ``window_size`` windows of the patch grid (published 6: 4x4
       windows of LLaVA's 24x24 grid). Tokens are visited by descending shallow-layer
       [CLS] attention and taken while their window holds fewer than ``ceil(L / W)``
       (``W`` windows) until ``L`` are taken.
    2. Global scan: the ``T - L`` tokens with the highest [CLS] attention of the
       selected (deep) layer, ``context.cls_attention``, among those not taken locally.
    3. Merging (``merge=True``, published): every dropped token is averaged into its
       most cosine-similar kept token (kept token weight 1; ``sizes`` count them).
       At ``projector`` this uses the projected features, as the official code merges
       after ``mm_projector``; at ``vision_encoder`` it merges in the vision width.

    **LLM side** (``llm_layer``, published: layer 16, keep 32): the image tokens are
    ranked by the attention the last instruction token pays them, computed with that
    layer's own q/k (``AttentionRows(query="last", layer="current")``,
    averaged over heads, recomputed for that row only, so the model keeps
    SDPA/FlashAttention); the top ``T`` are kept, the rest dropped (no merging), as
    PyramidDrop does.

    Deviations from the official code (``Tencent/SelfEvolvingAgent``, ``VScan/``):

    * Local signal: the official LLaVA code scans locally by the [CLS] attention of
      encoder layer 5 (``attentions[5]``). The class declares ``shallow_cls_layer = 5``;
      the LLaVA-family adapters recompute that layer's head-averaged [CLS] row (that row
      only, so the tower stays on SDPA) and pass it as
      ``context.extra["shallow_cls_attention"]`` (``(B, N)``). Without it (towers with
      fewer than 6 layers, direct calls) the local scan falls back on the selected
      layer's ``cls_attention`` (``info["local_signal"]`` says which was used).
    * Local counts: the official LLaVA code takes exactly ``L // 16`` tokens in each
      of its 16 windows, so when ``L`` is not a multiple of 16 it keeps fewer than
      ``T`` tokens (``T=100``: 48 local + 50 global = 98). Here the official Qwen2.5-VL
      rule is used everywhere (at most ``ceil(L / W)`` per window, exactly ``L`` in
      all), which gives the same tokens whenever ``W`` divides ``L`` (the published
      ``T=96``: 48 local tokens, 3 per window; also ``T`` = 64, 128, 192) and exactly
      ``T`` otherwise. Any grid and window size work (the official LLaVA code requires
      576 tokens); without ``context.grid`` the tokens form a square grid when ``N`` is
      a square, else one row cut into runs of ``window_size**2``. If the windows cannot
      hold ``L`` (padding), the global scan takes the rest.
    * The global scan excludes the local picks; the official code sets their score to
      zero, which differs only if fewer than ``T - L`` tokens have positive attention.
    * Counts: a ratio budget ``r`` keeps ``floor(r * N)`` tokens (``ratio_rounding =
      "floor"``), as the official Qwen2.5-VL code's ``int(ratio * N)`` at both stages
      (the LLaVA code takes absolute counts), and at least one.
    * Ties go to the lower index (the official code uses unstable ``topk``/``argsort``).
    * Qwen2.5-VL: the official code scores tokens by the mean attention they receive in
      a window-attention layer (local) and the last layer (global); no adapter provides
      either (and there is no [CLS]), so the Qwen adapter refuses the encoder step at
      patch time. The ``llm_layer`` step runs on every adapter; there the official
      Qwen2.5-VL code ranks with q/k *without* rotary embeddings (its RoPE line is
      commented out), while the adapter applies the layer's (M-)RoPE, as the official
      LLaVA code does.
    * LLaVA-NeXT: the official code scans each 24x24 crop on its own budget; the
      adapter reduces the base view and the packed crop grid, each on its share.

    Context: ``cls_attention`` at the encoder stages, ``attention`` at ``llm_layer``;
    each step asks an adapter only for its own stage's signal.

    Stages: ``vision_encoder``, ``projector``, ``llm_layer``.

    Paper: Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large
    Vision-Language Models", TMLR 2026, arXiv:2505.22654.
    Official code: https://github.com/Tencent/SelfEvolvingAgent/tree/main/VScan
    """

    name = "vscan"
    stages = frozenset({Stage.VISION_ENCODER, Stage.PROJECTOR, Stage.LLM_LAYER})
    Params = VScanParams
    requires = RequiresByStage(
        {Stage.VISION_ENCODER: _ENCODER_NEEDS, Stage.PROJECTOR: _ENCODER_NEEDS, Stage.LLM_LAYER: _LLM_NEEDS},
        unset=Stage.PROJECTOR,
    )
    ratio_rounding = "floor"  # official (Qwen2.5-VL code): int(ratio * N) at both stages
    # The local scan's encoder layer (official LLaVA code: attentions[5]): the LLaVA-family
    # adapters recompute its [CLS] row and pass it as context.extra["shallow_cls_attention"].
    shallow_cls_layer = 5
    graph_safe = True
    paper = (
        'Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", '
        "TMLR 2026, arXiv:2505.22654 (github.com/Tencent/SelfEvolvingAgent/tree/main/VScan)"
    )

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        if Stage(context.stage) is Stage.LLM_LAYER:
            return self._prune(tokens, counts, valid, context)
        return self._scan(tokens, counts, valid, context)

    def _need(self, context: ReductionContext, field: str, stage: str) -> torch.Tensor:
        value = getattr(context, field)
        if value is None:
            raise MissingContextError(
                f"reducer 'vscan' at stage {stage} needs context {field}; construct it with stage={stage!r} "
                "so an adapter supplies it, or pass it in the ReductionContext"
            )
        return value

    def _prune(self, tokens, counts, valid, context):
        scores = attention_scores(self._need(context, "attention", "llm_layer"), tokens, self.name)
        order, slots = ops.topk_per_row(scores, counts, valid, context.uniform_count)
        indices = ops.ascending(order, slots)
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info={"scores": scores})

    def _scan(self, tokens, counts, valid, context):
        p = self.params
        b, n, _ = tokens.shape
        dev = tokens.device
        deep = cls_scores(self._need(context, "cls_attention", str(Stage(context.stage).value)), tokens, self.name)
        shallow = context.extra.get(SHALLOW_KEY)
        if shallow is None:
            local_scores, signal = deep, "cls_attention"
        else:
            if tuple(shallow.shape) != (b, n):
                raise InvalidInputError(
                    f"vscan: context.extra[{SHALLOW_KEY!r}] must have shape (B, N)=({b}, {n}), "
                    f"got {tuple(shallow.shape)}"
                )
            local_scores, signal = shallow.float().to(dev), SHALLOW_KEY
        # Host-known bounds: the uniform count when there is no mask (no device read),
        # else the largest row count (the masked path has synchronised already).
        t = context.uniform_count if context.uniform_count is not None else int(counts.max())
        # floor(T * ratio) in float64, as the official int(T * ratio) in Python.
        n_local = torch.floor(counts.double() * p.local_ratio).long()
        t_local = int(math.floor(t * p.local_ratio))

        # 1. Local scan: greedy by descending shallow attention, at most ceil(L / W) per window.
        window, n_windows = window_ids(n, context.grid, p.window_size, dev)
        rank = rank_in_window(local_scores, window, valid, n_windows)
        limit = (n_local + n_windows - 1) // n_windows
        eligible = valid & (rank < limit.unsqueeze(1))
        n_local = torch.minimum(n_local, eligible.sum(dim=1))
        order, slots = ops.topk_per_row(local_scores, n_local, eligible, t_local)
        local = ops.keep_mask_from(order, slots, n)

        # 2. Global scan: the deep layer's top tokens among the rest.
        order, slots = ops.topk_per_row(deep, counts - n_local, valid & ~local, t)
        glob = ops.keep_mask_from(order, slots, n)

        kept = local | glob
        slots = ops.slot_mask(counts, t)
        positions = torch.where(kept, torch.arange(n, device=dev), n)  # dropped sort last
        indices = torch.sort(positions, dim=1).values[:, :t].masked_fill(~slots, -1)
        info: dict[str, Any] = {"scores": deep, "local_scores": local_scores, "local": local, "global": glob,
                                "local_signal": signal}
        if not p.merge:
            return make_reduction(tokens, indices, slots, sizes=slots.float(), info=info)
        # 3. Merge every dropped token into its most cosine-similar kept token (weight 1 each),
        # on rows divided by a power of two when their magnitude is extreme (exact: cosines
        # and means unchanged), so float32 sums of bfloat16 tokens near 1e38 cannot overflow.
        x, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)
        # x is what merge_nearest's own rescaling would make of it (float32, in range, zero at
        # padding), so prescaled skips that pass: the same bits, three passes fewer.
        features, sizes, info["assignment"] = merge_nearest(x, indices, slots, valid, prescaled=True)
        features = unscale(features, scale, tokens.dtype)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)
