"""``dycoke`` / ``dycoke-kv``: DyCoke's temporal token merging and its decode-time KV pruning."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from tokenreduce import FRAMES, GRID, AttentionRows, ReducerParams, ScoringReducer, Stage, ops
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale
from tokenreduce.pipeline import Pipeline, Step

from .fastv import attention_scores

PAPER = (
    'Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", '
    "CVPR 2025, arXiv:2411.15024 (github.com/KD-TAO/DyCoke)"
)

#: Published setting (the official lmms-eval defaults that ``eval.sh`` runs): TTM prunes
#: ``K = 0.7`` of each pruned frame's tokens; decoding keeps ``1 - P = 0.2`` of the visual
#: tokens' cache entries from layer ``L = 3`` on.
PUBLISHED_PRUNING_RATIO = 0.7
PUBLISHED_KV_LAYER = 3
PUBLISHED_KV_PRUNING_RATIO = 0.8

#: Where a decode-time step finds the previous decode step's attention row (see DyCokeKV).
PREVIOUS_ATTENTION = "previous_attention"


def frame_references(frames: int) -> list[int]:
    """Per frame, the frame it is pruned against in the official TTM (``-1``: an anchor, kept whole).

    Official ``dycole_ttm``: in each pair ``(2m, 2m+1)`` the odd frame is compared with the
    even one; then for ``i in range(0, T - 4, 4)`` frame ``i + 2`` is compared with frame
    ``i`` (so the last window's third frame, e.g. frame 30 of 32, stays whole: the official
    range stops one window early). Comparisons are always with the unpruned reference.
    """
    refs = [-1] * frames
    for f in range(1, frames, 2):
        refs[f] = f - 1
    for i in range(0, frames - 4, 4):
        refs[i + 2] = i
    return refs


def official_budget(frames: int, tokens_per_frame: int, pruning_ratio: float = PUBLISHED_PRUNING_RATIO) -> int:
    """The number of tokens the official TTM keeps for one video (our budget for the same selection).

    Anchors keep all ``P`` tokens, every other frame ``int((1 - K) * P)`` (the official
    float arithmetic: ``K = 0.7``, ``P = 196`` keeps 58). 32 frames of 196 tokens -> 3098.
    """
    per_pruned = int((1 - pruning_ratio) * tokens_per_frame)
    refs = frame_references(frames)
    return sum(tokens_per_frame if r < 0 else per_pruned for r in refs)


def _frame_layout(tokens: torch.Tensor, context: ReductionContext, name: str) -> tuple[int, int]:
    """``(T, P)``: frames and tokens per frame, checked against the tokens and the grid."""
    n = tokens.shape[1]
    t = context.frames
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise InvalidInputError(f"{name}: context.frames must be an int >= 1 (frames of the video), got {t!r}")
    h, w = context.grid  # type: ignore[misc]  # required context: present
    if h * w != n or n % t or h % t:
        raise InvalidInputError(
            f"{name}: the {n} tokens are not frames={t} complete frames of the grid {tuple(context.grid)} "
            "(frames stacked vertically); DyCoke compares each token with the token at the same place in "
            "another frame, so it needs every frame's whole token grid: run it as the first step on whole videos"
        )
    return t, n // t


class DyCoke(ScoringReducer):
    """DyCoke TTM: prune the tokens of a video frame that repeat the same place of an anchor frame.

    Temporal token merging (TTM), before the LLM. Frames come in windows of four: in every
    pair ``(2m, 2m+1)`` each token of the odd frame is compared (cosine similarity) with
    the token at the same spatial position in the even frame, and in each window
    ``(i .. i+3)`` frame ``i+2`` with frame ``i``; a compared frame keeps its tokens least
    similar to their reference (the others repeat it), the reference frames (anchors:
    frames ``0, 4, 8, ...`` and those the official window range leaves out, see
    :func:`frame_references`) are kept whole. Kept tokens are not changed (the official
    "merging" drops the repeated tokens).

    Budget (per video, ``video_budget: per_video``): anchors are kept whole; the rest is
    shared equally by the compared frames, the first ones in time taking one more each
    when it does not divide (a frame with fewer tokens left gives its share on).
    The official code fixes a ratio ``K`` instead (each compared frame keeps
    ``int((1 - K) * P)`` of its ``P`` tokens): :func:`official_budget` gives that count
    (LLaVA-OneVision, 32 frames x 196 tokens, published ``K = 0.7``: 3098), for which
    the selection is the official one. Below the anchors' total (a setting the method
    does not have), compared frames keep nothing and the anchors share the budget the
    same way, each keeping its tokens least similar to the frame before it (frame 0:
    to frame 1).

    Needs ``context.frames`` (``T``) and ``context.grid`` (``(T*h, w)``, the frames
    stacked): the adapters give them for whole videos (pipeline ``video_budget:
    per_video``) while every token is present; elsewhere the step is refused at patch
    time. Padded (invalid) tokens are never kept; a token whose reference is padding
    counts as not repeated.

    Deviations from the official code (KD-TAO/DyCoke ``llava_arch.dycole_ttm``): the
    budget above instead of ``K``; kept tokens stay in their original order (the
    official code puts a compared frame's kept tokens in ascending similarity order);
    similarity ties go to the lower index; an odd last frame is an anchor (the official
    code drops it), and videos of fewer than 5 frames work (the official code fails).
    Scores: ``info["scores"]`` is a priority (higher kept first), not a similarity.

    Stages: ``projector`` (published: the pooled, projected frame features) and
    ``vision_encoder`` (the same pooled grid in the vision width). Its decode-time half
    is :class:`DyCokeKV` (``dycoke-kv``).

    Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
    Models", CVPR 2025, arXiv:2411.15024. Official code: https://github.com/KD-TAO/DyCoke
    """

    name = "dycoke"
    stages = frozenset({Stage.VISION_ENCODER, Stage.PROJECTOR})
    requires = (FRAMES, GRID)
    graph_safe = True  # every size is host-known (frames, grid, uniform_count)
    paper = PAPER

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        t, p = _frame_layout(tokens, context, self.name)
        b, n, _ = tokens.shape
        dev = tokens.device
        # frame_references(t) built on the device (no host data: CUDA-graph safe). Anchors rank
        # their tokens against the frame before them (frame 0: frame 1), which matters only
        # when the budget cuts into the anchors.
        f = torch.arange(t, device=dev)
        odd = f % 2 == 1
        third = (f % 4 == 2) & (f < t - 2)  # i + 2 for i in range(0, T - 4, 4)
        compared = odd | third
        ref = torch.where(odd, f - 1, torch.where(third, f - 2, torch.where(f > 0, f - 1, f + min(1, t - 1))))
        # Cosine similarity is unchanged by the power-of-two row scale that keeps float32 finite.
        x = ops.normalize(safe_scale(tokens, valid)[0]).view(b, t, p, -1)
        v = valid.view(b, t, p)
        sim = (x * x[:, ref]).sum(dim=-1)
        sim = torch.where(v[:, ref], sim, torch.full_like(sim, -2.0))  # nothing to repeat: least similar
        sim = sim.masked_fill(~v, math.inf)
        # Rank of each token in its frame, least similar first (stable: ties to the lower index).
        order = torch.sort(sim, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(p, device=dev).expand_as(order))
        # Priority (lower first): anchors before compared frames, then rank, then frame, so the
        # top-T gives every frame of a level its equal share, the earlier frames the remainder.
        key = compared.long().view(1, t, 1) * n + rank * t + f.view(1, t, 1)
        return (-key.float()).view(b, n)  # exact in float32 while 2N < 2^24


class DyCokeKVParams(ReducerParams):
    similarity_threshold: float = Field(
        default=0.9,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="A decode step re-selects the visual tokens when the cosine similarity of its attention to "
        "them with the previous step's is below this (official: 0.9); otherwise that step attends to every "
        "visual token, as the official code does.",
    )


class DyCokeKV(ScoringReducer):
    """DyCoke dynamic KV pruning: per decode step, layers >= K attend only to the most-attended visual tokens.

    Acts while decoding, not on the prompt (class attribute ``acts_at = "decode"``, which
    the decoder machinery, :mod:`tokenreduce_plugins.adapters.decoder_kv`, reads): the
    prefill is left as it is and the cache keeps every entry. At each decode step (a
    forward of one new token continuing a cache whose prompt was prefilled under the
    patch), the attention the new token pays in layer ``K-1`` (recomputed from q/k, heads
    averaged, softmax over the whole cache) to the prompt's visual tokens is compared
    with the previous step's by cosine similarity (0 at the first step, as in the official
    code). Below ``similarity_threshold``, the step keeps the ``budget`` visual tokens with
    the most attention, and layers ``K`` and later attend only to their cache entries
    (and every non-visual entry); otherwise that step attends to all of them. Pruned
    entries stay in the cache, so a later step may attend to them again. Published:
    ``K = 3`` (``dycoke_l``), keep ``1 - P = 0.2`` (``dycoke_p = 0.8``), threshold 0.9.

    Pipeline form: one ``llm_layer`` step of this reducer at ``layer: K`` with a ratio
    budget of the visual tokens (kept: ``floor(r * n)``, as the official
    ``int(n * (1 - P))``; ``1 - 0.8`` is just below 0.2 in floating point, so the official
    count is one lower whenever ``0.2 n`` is an integer: ``budget = 1 - 0.8`` in Python
    gives it exactly). A decode-time step cannot share a pipeline with prefill
    ``llm_layer`` steps (refused at patch time). ``generate()`` with the cache equals a
    full recomputation in which each generated token's row, at layers ``>= K``, leaves
    out the visual tokens pruned at its step (see ``decoder_kv``); without a cache there
    are no decode steps and nothing is pruned. FlashAttention is refused (a per-step mask).

    The reducer call: ``tokens`` are the visual tokens' cached keys of layer ``K-1``,
    ``context.attention (B, 1, N)`` the new token's row, ``context.extra["previous_attention"]``
    the previous step's ``(B, N)`` (None at the first); ``info["similarity"]`` and
    ``info["refresh"] (B,)`` (similarity below the threshold: the row uses the selection).

    Deviations from the official code (KD-TAO/DyCoke ``PrunableDynamicCache`` and
    ``Qwen2Model.forward``): the attention row is recomputed for the one query (SDPA and
    eager stay; the official code computes the full weights); pruned entries are masked
    out rather than gathered away (the same attention: keys are cached after RoPE); the
    visual tokens are those the adapter marks (the official range starts at a fixed index,
    14 by default, and spans the TTM output but its last token: OneVision's video newline
    and last kept token are outside it, inside ours); the previous attention starts anew
    with every prompt (the official one carries over from the last prompt); each row of a
    batch is decided on its own (the official code runs batch 1). As in the official code
    a step whose attention did not change attends to all visual tokens (it does not reuse
    the last selection), and no entry is ever removed from the cache, so decoding is not
    cheaper here: the method's saving needs the gathered (shorter) attention.

    Stages: ``llm_layer`` only. The encoder-side half is :class:`DyCoke` (``dycoke``).

    Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
    Models", CVPR 2025, arXiv:2411.15024. Official code: https://github.com/KD-TAO/DyCoke
    """

    name = "dycoke-kv"
    stages = frozenset({Stage.LLM_LAYER})
    Params = DyCokeKVParams
    requires = (AttentionRows(query="last", layer="previous"),)
    ratio_rounding = "floor"  # official: int(n * (1 - P))
    acts_at: ClassVar[str] = "decode"
    graph_safe = True
    paper = PAPER

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        return attention_scores(context.attention, tokens, self.name)

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on the class
        out = super().reduce(tokens, counts, valid, context)
        sim = self.similarity(out.info["scores"], context.extra.get(PREVIOUS_ATTENTION), valid)
        out.info["similarity"] = sim
        out.info["refresh"] = sim < self.params.similarity_threshold
        return out

    def similarity(self, attention: torch.Tensor, previous: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cosine similarity of each row's attention ``(B, N)`` with the previous step's.

        0 where there is no previous step, as in the official code (so the first step
        re-selects for any positive threshold).
        """
        if previous is None:
            return torch.zeros(attention.shape[0], device=attention.device)
        if previous.shape != attention.shape:
            raise InvalidInputError(
                f"{self.name}: context.extra[{PREVIOUS_ATTENTION!r}] must have shape {tuple(attention.shape)} "
                f"(the previous decode step's attention to the same visual tokens), got {tuple(previous.shape)}"
            )
        cur = attention.float().masked_fill(~valid, 0)
        prev = previous.to(cur.device).float().masked_fill(~valid, 0)
        return F.cosine_similarity(cur, prev, dim=1)


def published_pipeline(frames: int = 32, tokens_per_frame: int = 196) -> Pipeline:
    """The published DyCoke on whole videos: TTM at the projector with the official count for
    ``K = 0.7``, then KV pruning from layer 3 keeping ``1 - 0.8`` of the visual tokens (computed
    as the official code does, so the counts are the official ones)."""
    return Pipeline(
        [
            Step(Stage.PROJECTOR, DyCoke(official_budget(frames, tokens_per_frame), stage=Stage.PROJECTOR)),
            Step(Stage.LLM_LAYER, DyCokeKV(1 - PUBLISHED_KV_PRUNING_RATIO, stage=Stage.LLM_LAYER), layer=PUBLISHED_KV_LAYER),
        ],
        video_budget="per_video",
    )
