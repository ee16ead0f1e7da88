"""``prunevid`` / ``prunevid-llm``: PruneVid's spatial-temporal merging of a whole video, then
question-guided pruning inside the LLM."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenreduce import FRAMES, GRID, AttentionRows, Reducer, ReducerParams, ScoringReducer, Stage, make_reduction, ops
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale, unscale
from tokenreduce.pipeline import Pipeline, Step

from .prunevid_cluster import apportion, dpc_knn, refine_segments

#: Official setting (scripts/eval.sh, PLLaVA-7B): decoder layer 10's attention prunes its output,
#: i.e. the input of layer 11 here; alpha = 0.4 of the video tokens kept there.
OFFICIAL_SELECTED_LAYER = 10
OFFICIAL_ALPHA = 0.4


class PruneVidParams(ReducerParams):
    tau: float = Field(
        default=0.8,
        ge=-1.0,
        le=1.0,
        description="Static threshold: a position is static in a segment when the mean cosine similarity of "
        "its tokens over the segment's frame pairs exceeds tau (official 0.8).",
    )
    segment_ratio: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Temporal clusters = max(1, int(frames * segment_ratio)) before the refinement into "
        "segments (official temporal_segment_ratio 0.25).",
    )
    cluster_ratio: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Official count of a group of n tokens: int(n * cluster_ratio) clusters, or n when "
        "n <= small_group (official 0.5). With a budget it sets how the budget is shared.",
    )
    k: int = Field(default=7, ge=1, description="Neighbours of the DPC-KNN density, temporal and spatial (official 7).")
    small_group: int = Field(
        default=14,
        ge=0,
        description="Groups of at most this many tokens count whole in the official count (the official "
        "code clusters a group only above 14 tokens).",
    )


class PruneVid(Reducer):
    """PruneVid: merge a video's static tokens over time, then cluster each group spatially (DPC-KNN).

    One row is one whole video (``video_budget: per_video``): ``context.frames = T`` frames
    of ``L = N / T`` tokens each, frame after frame, the same ``L`` positions in each
    (``context.grid``, present while every token is, vouches for that layout).

    1. Temporal segments: the frames' mean tokens are clustered by DPC-KNN into
       ``max(1, int(T * segment_ratio))`` clusters; each cluster keeps only its longest
       runs of consecutive frames, the other runs join their longer neighbour; segments
       are the runs that result (official ``refine_clusters``, ``segment_lengths``).
    2. Static / dynamic: in a segment of ``W >= 2`` frames, a position is static when the
       mean cosine similarity of its ``W`` tokens over all frame pairs exceeds ``tau``;
       its tokens become one token, their mean over the frames. The other tokens are
       dynamic and stay per frame.
    3. Spatial merging: each group (a segment's static tokens; a frame's dynamic tokens) is
       clustered by DPC-KNN; each cluster becomes the mean of its members, kept at its
       centre's index (a static centre at the segment's first frame). ``sizes`` count the
       input tokens a cluster stands for (a static member counts its ``W`` frames).

    Budget: the official count is that of the thresholds, per group ``int(n * cluster_ratio)``
    clusters, or all ``n`` tokens when ``n <= small_group`` (14), reported as
    ``info["official_count"]``. The budget ``T`` is shared over the groups in proportion
    to those official counts (largest remainders, ties to the earlier group), so ``T`` =
    the official count gives exactly the official clusters; a larger ``T`` adds the rest in
    proportion to what each group can still give (up to all its tokens). Below one share, a
    group gets no cluster and its tokens are dropped. When ``T`` exceeds the tokens left
    after the temporal merge, the least similar static positions (over the whole video)
    become dynamic until the video has ``T`` tokens to give. Ratio budgets are of ``N``.

    Deviations from the official code (Visual-AI/PruneVid, PLLaVA ``merge_frames_dynamic``):

    * Exact budgets instead of threshold-driven counts (above).
    * Batches: the official code segments every video like the batch's first one and
      needs equal static counts across the batch (it runs at batch 1); here each row is
      segmented and merged on its own.
    * Ties: the official densities carry 1e-6 of random noise; here density ties go to the
      lower index, score ties to the lower index, so the result is deterministic.
    * Small sets: a set of fewer than ``k`` tokens uses all of them for the density (the
      official ``topk`` would fail); a one-frame segment has no static tokens (the
      official similarity divides 0 by 0); fewer than ``1 / segment_ratio`` frames make
      one temporal cluster (the official count would be 0).
    * Padding (a mask): a position is static only if valid in every frame of its segment;
      frame means are over valid tokens.
    * Output order: kept tokens come in index order; the official code concatenates each
      segment's static clusters, then each frame's dynamic clusters, in centre score order.
    * Extreme magnitudes: rows far outside ``[2^-40, 2^40]`` are rescaled by a power of
      two before the distances (the official densities underflow there anyway).

    ``info``: ``segment`` (``(B, T)`` segment of each frame), ``static`` and ``group``
    (per token: at a static position; its group, frame ``t`` for dynamic tokens, ``T +
    segment`` for static ones), ``official_count`` (``(B,)``) and ``assignment`` (per token,
    the output slot it was merged into; -1 for dropped and padded tokens).

    Stages: ``projector`` (published: PLLaVA merges the projected, pooled frame features
    before the LLM) and ``vision_encoder``. Needs ``frames`` and ``grid``: adapters give
    them for whole videos only, so images, ``per_frame`` budgets and steps after another
    encoder-side reduction are refused. The LLM half is ``prunevid-llm``
    (:class:`PruneVidLLM`); the full method is :meth:`schedule`
    (``docs/examples/reducers/prunevid.yaml``).

    Paper: Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language
    Models", ACL 2025, arXiv:2412.16117.
    Official code: https://github.com/Visual-AI/PruneVid
    """

    name = "prunevid"
    stages = frozenset({Stage.PROJECTOR, Stage.VISION_ENCODER})
    Params = PruneVidParams
    requires = (FRAMES, GRID)
    # No device value is read: sizes come from frames, grid and context.uniform_count, and the
    # one loop (refine_segments) runs over the host-known frame count.
    graph_safe = True
    paper = (
        'Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models", '
        "ACL 2025, arXiv:2412.16117 (github.com/Visual-AI/PruneVid)"
    )

    def _layout(self, n: int, context: ReductionContext) -> tuple[int, int]:
        t, grid = context.frames, context.grid
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise InvalidInputError(f"{self.name}: context.frames must be an int >= 1 (frames per video), got {t!r}")
        if grid[0] * grid[1] != n or n % t:
            raise InvalidInputError(
                f"{self.name}: a row must be a whole video of frames x tokens-per-frame laid out as context.grid; "
                f"got N={n} tokens, frames={t}, grid={tuple(grid)} (needs grid h*w = N and N divisible by frames)"
            )
        return t, n // t

    def reduce(self, tokens, counts, valid, context):
        b, n, d = tokens.shape
        t, per = self._layout(n, context)
        p = self.params
        dev = tokens.device
        x, scale = safe_scale(tokens, valid)
        xf, vf = x.view(b, t, per, d), valid.view(b, t, per)

        seg, width, first = self._segments(xf, vf)
        seg_sum, sim, static = self._static(xf, vf, seg, width)
        w = width.unsqueeze(-1)
        official_count = self._official(static, seg, vf)[1].sum(dim=1)
        static = self._demote(static, sim, w, valid, counts)
        static_tok = static.gather(1, seg.unsqueeze(-1).expand(b, t, per))  # (B, T, L)

        # Groups: each frame's dynamic tokens (0..T-1), then each segment's static ones (T..2T-1).
        feats = torch.cat([xf, seg_sum / w.clamp(min=1).unsqueeze(-1)], dim=1)  # (B, 2T, L, D)
        member = torch.cat([vf & ~static_tok, static], dim=1)
        stands_for = torch.cat([torch.ones_like(w).expand(b, t, per), w.expand(b, t, per)], dim=1)
        pos = torch.arange(per, device=dev)
        frame_rep = (torch.arange(t, device=dev).view(1, t, 1) * per + pos).expand(b, t, per)
        rep = torch.cat([frame_rep, first.unsqueeze(-1) * per + pos], dim=1)  # (B, 2T, L) index of each slot
        size, official = self._official(static, seg, vf)
        total = official.sum(dim=1)
        share = torch.where(
            (counts <= total).unsqueeze(1),
            apportion(torch.minimum(counts, total), official),
            official + apportion((counts - total).clamp(min=0), size - official),
        )
        assign, _ = dpc_knn(feats.reshape(b * 2 * t, per, d), member.reshape(-1, per), share.reshape(-1), p.k)
        assign = assign.view(b, 2 * t, per)

        # Each cluster = the mean of its members, at its centre's index.
        target = torch.where(assign >= 0, rep.gather(2, assign.clamp(min=0)), torch.full_like(assign, -1))
        flat_target = target.reshape(b, -1)
        slots = ops.slot_mask(counts, context.uniform_count)
        t_out = slots.shape[1]
        # The clusters' indices (ascending) and each index's output slot: the sums go straight
        # to the T output slots, not to all N positions (a (B, T, ...) one-hot product on CUDA
        # instead of (B, N, ...), N / T times less work; on CPU the same additions in the same order).
        is_target = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        is_target.scatter_(1, torch.where(flat_target >= 0, flat_target, n), True)
        is_target = is_target[:, :n]
        order = torch.where(is_target, torch.arange(n, device=dev), n)
        indices = torch.sort(order, dim=1).values[:, :t_out].masked_fill(~slots, -1)
        slot_of = is_target.long().cumsum(dim=1) - 1  # output slot of each cluster index
        # Tokens of a cluster beyond the first T (only where the counts allow fewer) are dropped.
        out_slot = torch.where(flat_target >= 0, slot_of.gather(1, flat_target.clamp(min=0)), -1)
        out_slot = torch.where(out_slot < t_out, out_slot, -1)
        sums, members = ops.merge_into(feats.reshape(b, -1, d), out_slot, t_out)
        sizes_at, _ = ops.merge_into(stands_for.reshape(b, -1, 1).float(), out_slot, t_out)
        mean = sums / members.clamp(min=1).unsqueeze(-1)
        features = unscale(mean, scale, tokens.dtype)
        sizes = sizes_at[..., 0]
        info = self._info(seg, static_tok, official_count, target, indices, slots)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)

    def _segments(self, xf: torch.Tensor, vf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Temporal segments of the frames' mean tokens: ``(B, T)`` segment of each frame, and per
        segment id its frame count and first frame."""
        b, t = vf.shape[:2]
        dev = xf.device
        frame_mean = xf.sum(dim=2) / vf.sum(dim=2).clamp(min=1).unsqueeze(-1)
        n_clusters = max(1, int(t * self.params.segment_ratio))
        every = torch.ones(b, t, dtype=torch.bool, device=dev)
        labels, _ = dpc_knn(frame_mean, every, torch.full((b,), n_clusters, device=dev), self.params.k)
        seg = refine_segments(labels)
        width = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_add_(1, seg, torch.ones_like(seg))
        frame = torch.arange(t, device=dev).expand(b, t)
        first = torch.full((b, t), t, dtype=torch.long, device=dev).scatter_reduce(1, seg, frame, "amin")
        return seg, width, first

    def _static(self, xf, vf, seg, width):
        """Per segment and position: the sum of its tokens, their mean pairwise cosine similarity, and
        whether it is static (in every frame of a segment of >= 2 frames, similarity above tau)."""
        t = vf.shape[1]
        # Sums over each segment's frames as a one-hot product: deterministic on CUDA, where a
        # float scatter_add would add in a varying order.
        in_seg = (seg.unsqueeze(1) == torch.arange(t, device=xf.device).view(1, t, 1)).float()  # (B, seg, frame)
        unit = ops.normalize(xf) * vf.unsqueeze(-1)
        unit_sum = torch.einsum("bst,btld->bsld", in_seg, unit)
        seg_sum = torch.einsum("bst,btld->bsld", in_seg, xf)
        present = torch.einsum("bst,btl->bsl", in_seg, vf.float()).round().long()
        w = width.unsqueeze(-1)
        # sum over ordered pairs w != v of cos = |sum of unit vectors|^2 - W (the official "- 1" per frame).
        sim = (unit_sum.square().sum(dim=-1) - w) / (w * (w - 1)).clamp(min=1)
        static = (present == w) & (w >= 2) & (sim > self.params.tau)  # (B, segments, L)
        return seg_sum, sim, static

    def _official(self, static, seg, vf) -> tuple[torch.Tensor, torch.Tensor]:
        """``(size, official)``, ``(B, 2T)``: tokens per group and the official cluster count of each."""
        b, t, per = vf.shape
        static_tok = static.gather(1, seg.unsqueeze(-1).expand(b, t, per))
        size = torch.cat([(vf & ~static_tok).sum(dim=-1), static.sum(dim=-1)], dim=1)
        clustered = torch.floor(size.double() * self.params.cluster_ratio).long()
        return size, torch.where(size > self.params.small_group, clustered, size)

    @staticmethod
    def _demote(static, sim, w, valid, counts):
        """Turn the least similar static positions dynamic until the video has ``counts`` tokens to give."""
        b = static.shape[0]
        left = valid.sum(dim=1) - (static.long() * (w - 1)).sum(dim=(1, 2))
        need = (counts - left).clamp(min=0)
        key = torch.where(static, sim, torch.full_like(sim, float("inf"))).reshape(b, -1)
        order = torch.sort(key, dim=1, stable=True).indices
        gain = (static.long() * (w - 1)).reshape(b, -1).gather(1, order)
        before = gain.cumsum(dim=1) - gain
        demote_sorted = (gain > 0) & (before < need.unsqueeze(1))
        demote = torch.zeros_like(demote_sorted).scatter_(1, order, demote_sorted).view_as(static)
        return static & ~demote

    @staticmethod
    def _info(seg, static_tok, official_count, target, indices, slots) -> dict[str, Any]:
        """Diagnostics: segments, static tokens, official count, group and output slot of each token."""
        b, t, per = static_tok.shape
        n = t * per
        dev = seg.device
        # The group slot of token (t, l): dynamic -> (t, l); static -> (T + segment, l).
        group = torch.where(static_tok, t + seg.unsqueeze(-1), torch.arange(t, device=dev).view(1, t, 1))
        slot_of = group * per + torch.arange(per, device=dev)
        went_to = target.reshape(b, -1).gather(1, slot_of.reshape(b, n))  # its cluster's index, or -1
        # Output slot of each kept index; padded slots write to a spare column n.
        own = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
        slot_ids = torch.arange(indices.shape[1], device=dev).expand_as(indices)
        own.scatter_(1, torch.where(slots, indices, torch.full_like(indices, n)), slot_ids)
        assignment = torch.where(went_to >= 0, own.gather(1, went_to.clamp(min=0)), torch.full_like(went_to, -1))
        return {
            "segment": seg,
            "static": static_tok.reshape(b, n),
            "group": group.reshape(b, n),
            "official_count": official_count,
            "assignment": assignment,
        }

    @classmethod
    def schedule(
        cls,
        budget: int | float,
        llm_budget: int | float = OFFICIAL_ALPHA,
        layer: int = OFFICIAL_SELECTED_LAYER + 1,
        **params: Any,
    ) -> Pipeline:
        """The two-step method: this merge at ``projector``, ``prunevid-llm`` at decoder layer ``layer``."""
        return Pipeline(
            [
                Step(Stage.PROJECTOR, cls(budget, stage=Stage.PROJECTOR, **params)),
                Step(Stage.LLM_LAYER, PruneVidLLM(llm_budget, stage=Stage.LLM_LAYER), layer=layer),
            ],
            video_budget="per_video",
        )


class PruneVidLLM(ScoringReducer):
    """PruneVid (LLM half): keep the video tokens the question attends to most, at one decoder layer.

    At decoder layer ``K`` the video tokens are ranked by the largest attention any text
    token after the video (the question and the answer prompt) pays them; the top ``T``
    are kept, the rest dropped from the sequence of the later layers. Official: layer 10's
    attention prunes its output (the input of layer 11 here: ``layer: 11``,
    ``AttentionRows(layer="previous")``) keeping ``alpha = 0.4``; a ratio budget keeps
    ``floor(r * N)`` (``ratio_rounding = "floor"``, the official ``int(size * alpha)``).

    Deviations from the official code (``VTPWindowCache.process_attention``):

    * Heads: the adapter gives head-averaged attention rows; the official code takes the
      maximum over heads (then over the text tokens, as here).
    * The official rows are an extra softmax of layer 10's queries and keys without RoPE and
      without the causal mask; the adapter recomputes the causal, rotary attention rows of
      the text tokens (the model keeps SDPA / FlashAttention).
    * Groups: the official code keeps ``int(alpha * n)`` per group (each segment's static
      tokens, each frame's dynamic tokens, as ``prunevid`` formed them); the decoder step
      does not see those groups, so one budget is kept over all the image and video
      tokens the decoder step is given (with LLaVA-OneVision, the video's newline too).
    * KV cache: the official code also cuts the caches of layers ``0..10`` to the kept
      tokens, so decoding steps there no longer see the dropped ones; the decoder adapter
      keeps each layer's cache as that layer saw the sequence.

    Stages: ``llm_layer``. Needs ``attention`` (``text_mask`` marks the real text rows).

    Paper: Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language
    Models", ACL 2025, arXiv:2412.16117.
    Official code: https://github.com/Visual-AI/PruneVid
    """

    name = "prunevid-llm"
    stages = frozenset({Stage.LLM_LAYER})
    requires = (AttentionRows(query="text", layer="previous"),)
    ratio_rounding = "floor"  # official: int(size * alpha)
    graph_safe = True
    paper = PruneVid.paper

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        b, n, _ = tokens.shape
        att = context.attention
        if att.dim() != 3 or att.shape[0] != b or att.shape[2] != n or att.shape[1] < 1:
            raise InvalidInputError(
                f"{self.name}: context.attention must have shape (B, Q, N)=({b}, Q>=1, {n}), got {tuple(att.shape)}"
            )
        att = att.float().to(tokens.device)
        mask = context.text_mask
        if mask is not None and tuple(mask.shape) == tuple(att.shape[:2]):
            # Attention is >= 0: padded text rows at 0 never win the maximum.
            att = att.masked_fill(~mask.to(tokens.device).bool().unsqueeze(-1), 0.0)
        return att.amax(dim=1)
