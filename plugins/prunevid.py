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

from .prunevid_cluster import (
    apportion,
    constant,
    dpc_knn,
    first_true,
    gram_distances,
    gram_norms,
    position_gram,
    positions,
    refine_segments,
)
from .ranking import stable_order

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
    * On CUDA (cost, issue 19; :func:`tokenreduce.ops.cuda_formulas`) the cosine similarities
      come from each position's Gram matrix over the frames (TF32, as other similarities) and
      the distances from Gram matrices of each frame's tokens and each segment's means (full
      float32), instead of normalised copies and ``cdist``; a merged token is one product of
      0/1 weights with the tokens over their count; divisions by host-known counts may be
      products with the reciprocal. The same method up to rounding: a near-tie (a similarity
      at ``tau``, equal densities or scores) can resolve differently than on CPU, which keeps
      the elementwise forms.
      With Triton, the stable sorts that rank tokens, the scale and the clustering after the
      densities run as fused kernels (:mod:`tokenreduce_plugins.ranking`): the same results,
      except that equal keys ``-0.0`` and ``+0.0`` keep their positions as on CPU (CUDA's
      radix sort puts ``-0.0`` first).

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
    # loops (refine_segments' scan rounds) run over host-known counts.
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
        full = context.uniform_count is not None  # no mask: every token valid, no masking passes
        fast = ops.cuda_formulas(tokens)
        x, scale = safe_scale(tokens, None if full else valid)
        xf, vf = x.view(b, t, per, d), valid.view(b, t, per)

        seg, in_seg = self._segments(xf, vf, full)
        width = in_seg.sum(dim=2)  # (B, S) frames of each segment id
        w = width.unsqueeze(-1)
        in_seg_f = in_seg.float()
        # Sums over each segment's frames as a one-hot product: deterministic on every device.
        seg_sum = None if fast else torch.einsum("bst,btld->bsld", in_seg_f, xf)
        sim = self._similarity(xf, in_seg_f, w, fast)
        # (B, segments, L); the CUDA form's similarity is -inf in segments of fewer than 2 frames.
        static = sim > p.tau if fast else (w >= 2) & (sim > p.tau)
        if not full:
            present = torch.einsum("bst,btl->bsl", in_seg_f, vf.float()).round().long()
            static &= present == w
        # The official count (before demotion) and the groups' sizes and counts after it, in one pass.
        kept_static = self._demote(static, sim, w, counts, n if full else valid.sum(dim=1))
        static_tok, member, size, official = self._official(torch.stack([static, kept_static]), seg, vf, full)
        official_count = official[0].sum(dim=1)
        static, static_tok, member, size, official = kept_static, static_tok[1], member[1], size[1], official[1]
        total = official.sum(dim=1)
        # counts <= total: the counts split in proportion to the official ones; above: all of those
        # plus the rest in proportion to what each group can still give. One apportion for both.
        over = counts > total
        share = official * over.unsqueeze(1) + apportion(
            counts - total * over, torch.where(over.unsqueeze(1), size - official, official)
        )

        # Groups (member): each frame's dynamic tokens (0..T-1), then each segment's static ones (T..2T-1).
        pos = positions(per, dev)
        # (B, 2T, L + 1) index of each slot: a frame's tokens, a segment's at its first frame (the
        # first maximum of its frames; empty segments have no members), a spare column n for none.
        first = torch.nn.functional.pad(in_seg_f.argmax(dim=2), (t, 0))
        base, step, per_t = constant(f"prunevid_slots/{per}", t, dev, lambda: _slot_tables(t, per, dev))
        rep = torch.addcmul(base, first.unsqueeze(-1), step)
        if fast:
            feats = None
            dist = self._group_distances(xf, in_seg_f, width)
            assign, _ = dpc_knn(None, member.view(-1, per), share.view(-1), p.k, dist=dist.view(-1, per, per))
        else:
            feats = torch.cat([xf, seg_sum / w.clamp(min=1).unsqueeze(-1)], dim=1)  # (B, 2T, L, D)
            assign, _ = dpc_knn(feats.view(-1, per, d), member.view(-1, per), share.view(-1), p.k)
        assign = assign.view(b, 2 * t, per)

        # Each cluster = the mean of its members, at its centre's index (tokens of no cluster: n,
        # -1 % (L + 1) = L being the spare column).
        target = rep.gather(2, assign % (per + 1)).view(b, -1)
        slots = ops.slot_mask(counts, context.uniform_count)
        t_out = slots.shape[1]
        # The clusters' indices (ascending) and each index's output slot.
        is_target = torch.zeros(b, n + 1, dtype=torch.uint8, device=dev).scatter_(1, target, 1)
        indices = first_true(is_target[:, :n], t_out, None if full else slots)
        slot_of = is_target.cumsum(dim=1) - 1  # output slot of each cluster index
        # The shares sum to the row's count, so the clusters take slots 0 .. count - 1 and the spare
        # column n comes right after: slot count, none.
        out_slot = slot_of.gather(1, target)
        out_slot = out_slot.masked_fill(out_slot >= (t_out if full else counts.unsqueeze(1)), -1)
        # Each token's group slot (dynamic: its frame's; static: its segment's) and output slot.
        group = torch.where(static_tok, t + seg.unsqueeze(-1), positions(t, dev).view(1, t, 1))
        token_slot = out_slot.gather(1, torch.addcmul(pos, group, per_t).view(b, n))
        if fast:
            # The sums over the slots' source tokens (a static member: its W frames) as one product
            # of 0/1 weights; divided by their count, the means of the members' means.
            weights = torch.empty(b, t_out, n, device=dev)
            torch.eq(token_slot.unsqueeze(1), positions(t_out, dev).view(1, t_out, 1), out=weights)  # as 0/1 floats
            sizes = weights.sum(dim=2)
            with ops.full_float32(dev):  # sums of features
                sums = torch.bmm(weights, x)
            # Without a mask every slot holds a cluster, at least its centre.
            mean = sums / (sizes if full else sizes.clamp(min=1)).unsqueeze(-1)
        else:
            stands_for = torch.cat([torch.ones_like(w).expand(b, t, per), w.expand(b, t, per)], dim=1)
            sums, members = ops.merge_into(feats.view(b, -1, d), out_slot, t_out)
            sizes = ops.merge_into(stands_for.reshape(b, -1, 1).float(), out_slot, t_out)[0][..., 0]
            mean = sums / members.clamp(min=1).unsqueeze(-1)
        info = {
            "segment": seg,
            "static": static_tok.reshape(b, n),
            "group": group.reshape(b, n),
            "official_count": official_count,
            # The cluster count is the row's count: every cluster has an output slot.
            "assignment": token_slot,
        }
        features = unscale(mean, scale, tokens.dtype)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)

    def _segments(self, xf: torch.Tensor, vf: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Temporal segments of the frames' mean tokens: ``(B, T)`` segment of each frame and
        ``(B, S, T)`` bool, frame ``t`` in segment id ``s``."""
        b, t = vf.shape[:2]
        dev = xf.device
        n_clusters = max(1, int(t * self.params.segment_ratio))
        if full and ops.cuda_formulas(xf):
            # The means over sqrt(D) as one product of the sums: their distances need no division.
            scaled = xf.sum(dim=2).mul_(1.0 / (vf.shape[2] * xf.shape[3] ** 0.5))
            labels, _ = dpc_knn(None, None, n_clusters, self.params.k, dist=torch.cdist(scaled, scaled))
        else:
            # CPU divides by a host number exactly as by a tensor of it (CUDA: times its reciprocal).
            frame_mean = xf.sum(dim=2) / (vf.shape[2] if full else vf.sum(dim=2).clamp(min=1).unsqueeze(-1))
            labels, _ = dpc_knn(frame_mean, None, n_clusters, self.params.k)
        seg = refine_segments(labels)
        return seg, seg.unsqueeze(1) == positions(t, dev).view(1, t, 1)

    @staticmethod
    def _similarity(xf, in_seg_f, w, fast) -> torch.Tensor:
        """Per segment and position, ``(B, segments, L)``: the mean cosine similarity of its tokens
        over the segment's frame pairs."""
        if not fast:
            # Padded tokens are zero (safe_scale), so their unit vectors are too.
            unit_sum = torch.einsum("bst,btld->bsld", in_seg_f, ops.normalize(xf))
            # sum over ordered pairs w != v of cos = |sum of unit vectors|^2 - W (the official "- 1" per frame).
            pairs = unit_sum.square().sum(dim=-1)
            return (pairs - w) / (w * (w - 1)).clamp(min=1)
        # The same sum over ordered pairs (w = v included), from each position's Gram matrix over the
        # frames: one product with each segment's pairs of frames (t, u).
        b, t, per, _ = xf.shape
        gram = position_gram(xf)  # (B, L, T, T)
        norm = gram_norms(gram)
        cos = gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))
        pair = (in_seg_f.unsqueeze(3) * in_seg_f.unsqueeze(2)).view(b, -1, t * t)
        pairs = torch.matmul(pair, cos.view(b, per, t * t).transpose(1, 2))  # (B, S, L)
        # W and W (W - 1) tabled per width (as float32, exact); below 2 frames, -inf: never static.
        table = constant("prunevid_pair_counts", t, xf.device, lambda: _pair_counts(t, xf.device))[w]
        return (pairs - table[..., 0]) / table[..., 1]

    @staticmethod
    def _group_distances(xf, in_seg_f, width) -> torch.Tensor:
        """``(B, 2T, L, L)`` distances over ``sqrt(D)`` within each group from Gram matrices (the CUDA
        form): a frame's tokens, then each segment's means over its frames (every position's; the
        caller masks). The ``1 / sqrt(D)`` is applied to the features (the products' scale)."""
        b, t, per, d = xf.shape
        dev = xf.device
        # Each segment's means over sqrt(D): one product with 1 / (W sqrt(D)) at its frames.
        coef = constant(f"prunevid_mean_coef/{d}", t, dev, lambda: 1.0 / (positions(t + 1, dev).clamp(min=1) * d**0.5))
        means = torch.einsum("bst,btld->bsld", in_seg_f * coef[width].unsqueeze(-1), xf)
        flat = xf.view(b * t, per, d)
        # In full float32 (cancelled against the norms: no TF32), split along D (ops.gram).
        frames = ops.gram(flat).mul_(1.0 / d)
        sums = ops.gram(means)
        return gram_distances(torch.cat([frames.view(b, t, per, per), sums], dim=1))

    def _official(self, static, seg, vf, full) -> tuple[torch.Tensor, ...]:
        """``(static_tok (..., B, T, L), member (..., B, 2T, L), size, official (..., B, 2T))``: per
        token, at a static position; the groups' tokens (each frame's dynamic ones, then each
        segment's static ones), their count and their official cluster count."""
        static_tok = static.gather(-2, seg.unsqueeze(-1).expand(static.shape))
        member = torch.cat([~static_tok if full else vf & ~static_tok, static], dim=-2)
        size = member.sum(dim=-1)
        # int(n * cluster_ratio) for every group size n (at most L) above small_group, else n, tabled
        # once (in float64, as Python's).
        ratio, small, per, dev = self.params.cluster_ratio, self.params.small_group, static.shape[-1], static.device
        table = constant(
            f"official_count/{ratio!r}/{small}", per, dev, lambda: _official_counts(per, ratio, small, dev)
        )
        return static_tok, member, size, table[size]

    @staticmethod
    def _demote(static, sim, w, counts, valid_count):
        """Turn the least similar static positions dynamic until the video has ``counts`` tokens to give."""
        b = static.shape[0]
        gain = (static * (w - 1)).view(b, -1)  # tokens a static position's merge removes
        # (Negative: none; the running sums below are >= 0 anyway.)
        need = gain.sum(dim=1) + (counts - valid_count)
        inf = constant("inf", 0, sim.device, lambda: torch.full((), float("inf"), device=sim.device))
        order = stable_order(torch.where(static, sim, inf).view(b, -1))
        gain = gain.gather(1, order)
        # In that order the static positions (gain > 0) come first; those reached before the need is met stay.
        stays = (gain > 0) & (gain.cumsum(dim=1) - gain >= need.unsqueeze(1))
        return torch.zeros_like(stays).scatter_(1, order, stays).view(static.shape)

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


def _slot_tables(t: int, per: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(2T, L + 1)`` long tables of :meth:`PruneVid.reduce`'s slot indices: the index of each
    slot before its segment's offset (a frame's tokens; a segment's positions; the spare column
    ``n``), and the offset's factor (``L`` at a segment's positions, else 0); and ``L`` (0-d)."""
    n = t * per
    base = torch.full((2 * t, per + 1), n, dtype=torch.long, device=device)
    base[:t, :per] = torch.arange(n, device=device).view(t, per)
    base[t:, :per] = torch.arange(per, device=device)
    step = torch.zeros_like(base)
    step[t:, :per] = per
    return base, step, torch.full((), per, dtype=torch.long, device=device)


def _official_counts(per: int, ratio: float, small: int, device: torch.device) -> torch.Tensor:
    """``(L + 1,)`` long: the official cluster count of a group of ``n`` tokens, ``int(n * ratio)``
    above ``small`` tokens, else ``n``."""
    size = positions(per + 1, device)
    return torch.where(size > small, (size.double() * ratio).floor().long(), size)


def _pair_counts(t: int, device: torch.device) -> torch.Tensor:
    """``(T + 1, 2)`` float32: per segment width ``W``, ``W`` and ``W (W - 1)`` (``inf`` and 1 below 2)."""
    w = torch.arange(t + 1, device=device, dtype=torch.float32)
    return torch.stack([torch.where(w >= 2, w, float("inf")), (w * (w - 1)).clamp(min=1)], dim=1)


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
