"""``fastvid``: temporal segments by frame similarity, then salient tokens and merged density anchors per segment."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tokenreduce import FRAME_INDEX, FRAMES, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale, unscale
from tokenreduce.sync import host_reads_free

from .fastvid_parts import (
    density_scores,
    frame_blocks,
    merge_into_anchors,
    rank_desc,
    segment_layout,
    segments,
    split_budget,
)
from .prunevid_cluster import constant, first_true, gram_norms, positions


class FastVIDParams(ReducerParams):
    min_segments: int = Field(
        default=8,
        ge=1,
        description="c (DySeg_c): the video is cut at least at its c - 1 least similar adjacent-frame pairs "
        "(fewer when it has fewer frames). Official: 8.",
    )
    tau: float = Field(
        default=0.9,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="DySeg_tau: the video is also cut wherever adjacent frames' cosine similarity is below tau. "
        "Official: 0.9 (LLaVA-OneVision, LLaVA-Video), 0.84 (Qwen2.5-VL).",
    )
    context_ratio: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="d (STPrune_d): of a frame's retention R, C = int(R * d) go to density anchors (contextual "
        "tokens) and R - C to salient tokens. Official: 0.4.",
    )
    anchor_interval: int = Field(
        default=4,
        ge=1,
        description="p (DTM_p): in a segment, every p-th frame counted back from its last one is an anchor frame. "
        "Official: 4.",
    )
    beta: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="DTM_beta: an anchor keeps weight max(1 / (m + 1), beta) in its merged feature (m tokens "
        "joined it, itself included). Official: 0.6; 1 keeps anchors unchanged.",
    )


class FastVID(Reducer):
    """FastVID: segment a video by frame similarity, keep salient tokens and density anchors, merge the rest into them.

    One row is one whole video of ``F = context.frames`` frames (the adapters' ``video_budget:
    per_video``); ``context.frame_index`` gives each token's frame. As the official
    LLaVA-OneVision code (its "parallel" implementation), with ``n`` tokens per frame:

    1. **DySeg.** Each frame's global feature ``g_t`` is the mean of its tokens. With
       ``s_t = cos(g_t, g_{t+1})`` the video is cut after frame ``t`` where ``s_t`` is among
       the ``c - 1`` smallest (``min_segments``) or ``s_t < tau``.
    2. **Budget split.** A per-frame retention ``R`` gives ``C = int(R d)`` contextual and
       ``S = R - C`` salient tokens (``context_ratio`` ``d``). In a segment of ``len``
       frames the anchor frames are every ``p``-th frame counted back from its last one
       (``anchor_interval``); each holds ``cur = C len // ceil(len / p)`` anchors, so the
       segment's ``C len`` contextual tokens sit on ``ceil(len / p)`` frames.
    3. **Salient tokens (ATS).** Every frame keeps its ``S`` tokens with the highest
       salient score (below), unchanged.
    4. **Anchors (DPC-kNN).** Among a frame's other tokens, with ``d_ij = ||x_i - x_j|| /
       sqrt(D)``: density ``rho_i = exp(-mean of the 4 smallest d_ij^2)`` (itself
       included), ``delta_i`` = distance to the nearest denser token (the frame's largest
       distance for the densest); an anchor frame keeps its ``cur`` tokens of highest
       ``delta rho``.
    5. **Merging (DTM).** Single-frame segments (and any anchor frame holding exactly
       ``C``): every non-salient token of the frame joins its most cosine-similar anchor.
       Longer segments: every non-salient token of the *whole segment* joins, for each
       anchor frame of the segment, that frame's most similar anchor (so it is averaged
       into one anchor per anchor frame, as officially). An anchor becomes ``w x + (1 - w)
       mean(joined)`` with ``w = max(1 / (m + 1), beta)`` for ``m`` joined tokens (itself
       among them): ``0.6 x + 0.4 mean`` at the default ``beta``.

    **Budget.** The official code takes a per-frame ratio ``r`` (``R = int(n r)``) and keeps
    ``K(R) = F S + sum over segments of ceil(len/p) * (C len // ceil(len/p))`` tokens, at
    most ``F R``. Here the budget ``T`` is the whole video's: ``R`` is the smallest
    retention whose count ``K(R)`` is the largest not above ``T`` (``K`` is tabled for
    every ``R`` on the device), so a budget equal to the official count keeps exactly the
    official set. The ``T - K(R)`` tokens left over (fewer than one more step of ``R``
    adds, about ``F``) are *topped up*: the highest salient scores among the tokens not
    yet kept, anywhere in the video, kept unchanged and not merged (``info["topped_up"]``).
    A ratio budget ``r`` keeps ``int(r N)`` tokens (``ratio_rounding = "floor"``, the
    official ``int``); the official ``0.10`` keeps ``F int(0.1 n)`` minus the rounding of
    ``cur`` (e.g. 608 or fewer of 6,272 for 32 frames of 196), here ``int(0.1 N) = 627``
    with the difference topped up. Where an anchor frame holds fewer tokens than ``S + cur``
    (large budgets, where the official ``topk`` fails) it keeps what it has.

    Deviations from the official code:

    * **Salient score.** The official salient tokens come from attention in the vision
      encoder: on LLaVA-OneVision the attention of SigLIP's pooling-head probe (a head
      the HF checkpoints drop, ``vision_use_head=False``; the official code loads it from
      the SigLIP release) bilinearly resized to the pooled grid; on Qwen2.5-VL the
      attention of each frame's mean query to its merged tokens' mean keys in the last
      vision block. No adapter provides either, so the score here is that last rule
      applied to the tokens being reduced, ``softmax_i(<g_t, x_i> / sqrt(D))`` over frame
      ``t``'s tokens (``info["salient_scores"]``).
    * **Global features** (DySeg): the mean of the frame's tokens being reduced, as the
      official Qwen2.5-VL code (mean of the merger output); the official LLaVA-OneVision
      code uses the SigLIP pooling head's output.
    * **Ties** (densities, scores, similarities) go to the lower index; the official code
      adds 1e-6 random noise to the densities and leaves ``topk`` ties unspecified.
    * **Short videos.** With fewer than ``c`` frames every frame is its own segment (the
      official ``topk(c - 1)`` fails); fewer than 4 candidate tokens in a frame average
      over those there are.
    * The Qwen2.5-VL and LLaVA-Video releases use a sequential variant (salient tokens
      spread over a segment's frames, anchors not merged into themselves, Qwen's extra
      ``DySeg_ignore`` sub-segmentation); the LLaVA-OneVision rule above serves every model.
    * Kept tokens are returned in position order; ``sizes`` count each dropped token once,
      split over the anchors it joined.
    * On CUDA (cost, issue 19; :func:`tokenreduce.ops.cuda_formulas`) each frame's Gram
      matrix (full float32) gives the densities' distances (``cdist``'s direct form on CPU),
      the salient logits (``<x_i, g_t> = sum_j <x_i, x_j> / n``) and the tokens' norms, and
      DTM's cosine similarities are the tokens' product (TF32, as other similarities) over
      those norms. The same method up to rounding: a near-tie (equal densities, scores or
      similarities) can resolve differently than on CPU, which keeps the elementwise forms.
      With Triton, the stable sorts that rank tokens and the scale run as fused kernels
      (:mod:`tokenreduce_plugins.ranking`): the same results, except that equal keys ``-0.0``
      and ``+0.0`` keep their positions as on CPU (CUDA's radix sort puts ``-0.0`` first).

    Vectorised over the batch: segment boundaries, anchor frames and per-frame counts are
    masks and counts on the device; the densities are computed per frame on a ``(B, F,
    L)`` block layout and merging is one ``(B, N, T)`` similarity. A whole video
    (``context.grid`` set: frame ``t`` is tokens ``t N/F .. (t+1) N/F - 1``) needs no host
    read, and without padding its blocks are views of the tokens. After an earlier step
    removed tokens, frames differ in size: the block length ``L`` (the largest frame) is
    read once from the device, the only host synchronisation.

    Stages: ``projector`` (published: the official code prunes the projected, pooled video
    tokens at the LLM input), ``vision_encoder``. Needs ``frames`` and ``frame_index``, so
    only ``video_budget: per_video`` pipelines on video models (LLaVA-OneVision videos,
    Qwen-VL videos) run it; adapters refuse it elsewhere at patch time.

    Paper: Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language
    Models", NeurIPS 2025, arXiv:2503.11187. Official code: https://github.com/LunarShen/FastVID
    """

    name = "fastvid"
    stages = frozenset({Stage.PROJECTOR, Stage.VISION_ENCODER})
    Params = FastVIDParams
    requires = (FRAMES, FRAME_INDEX)
    ratio_rounding = "floor"  # official: int(frame_token_len * retention_ratio)
    # Frames laid out whole (the adapters' per-video rows: ``grid`` covers the N tokens) have
    # host-known sizes and the call reads nothing back: replayed from a CUDA graph. Other layouts
    # read the longest frame once; their capture fails and they run eagerly (tokenreduce.graphs).
    graph_safe = True
    paper = (
        'Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025, '
        "arXiv:2503.11187 (github.com/LunarShen/FastVID)"
    )

    def reduce(self, tokens, counts, valid, context):
        b, n, d = tokens.shape
        dev = tokens.device
        frames = self._frames(context)
        fi = self._frame_index(context, b, n)
        full = context.uniform_count is not None  # no mask: every token valid
        fast = ops.cuda_formulas(tokens)
        x, scale = safe_scale(tokens, None if full else valid)
        whole = context.grid is not None and n % frames == 0 and context.grid[0] * context.grid[1] == n
        # A whole video without padding: frame f is tokens f L .. (f + 1) L - 1, so the frame blocks
        # are views of the tokens and every slot is used (no masks, no gathers or scatters).
        dense = whole and full
        if whole:  # the adapters' layout of a whole video: equal frames, one after another
            length = n // frames
            frame = constant(f"frame_of/{length}", n, dev, lambda: positions(n, dev) // length).expand(b, n)
        else:
            frame = self._checked_frames(fi.to(device=dev, dtype=torch.long), valid, frames)
        if dense:
            present, ok, xb = length, None, x.view(b, frames, length, d)

            def to_tokens(block: torch.Tensor, fill) -> torch.Tensor:
                return block.reshape(b, n)

        else:
            present = ((frame.unsqueeze(-1) == positions(frames, dev)) & valid.unsqueeze(-1)).sum(dim=1)
            if not whole:
                length = max(1, int(present.max()))  # the one host read: frames of unequal size
            pos, ok = frame_blocks(valid, frame, frames, length)
            flat_pos = pos.clamp(max=n - 1)
            rows = (flat_pos + n * torch.arange(b, device=dev).view(b, 1, 1)).view(-1)
            xb = x.reshape(b * n, d).index_select(0, rows).view(b, frames, length, d).masked_fill(~ok.unsqueeze(-1), 0)

            def to_tokens(block: torch.Tensor, fill) -> torch.Tensor:
                out = torch.full((b, n + 1), fill, dtype=block.dtype, device=dev)
                return out.scatter_(1, pos.view(b, -1), block.view(b, -1))[:, :n]

        # 1. DySeg on the frames' mean tokens.
        means = xb.sum(dim=2) / (present if dense else present.clamp(min=1).unsqueeze(-1))
        seg, sim = segments(means, None if dense else present > 0, self.params.min_segments, self.params.tau)
        seg_len, anchor_frame, groups = segment_layout(seg, self.params.anchor_interval)
        # 2. The per-frame counts.
        plan = split_budget(counts, present, seg_len, anchor_frame, groups, length, self.params.context_ratio)
        # 3. Salient tokens: the frame mean's attention to the frame's tokens. CUDA: from each frame's
        # Gram matrix, <x_i, mean> = sum_j <x_i, x_j> / present (the densities below read it too).
        gram = None
        if fast:
            gram = ops.gram(xb)  # (B, F, L, L) in full float32: the distances cancel it against the norms
        if gram is None:
            logits = (xb * means.unsqueeze(2)).sum(dim=-1) / math.sqrt(d)
        else:
            logits = gram.sum(dim=-1) / (present if dense else present.clamp(min=1).unsqueeze(-1)) / math.sqrt(d)
        att = _block_softmax(logits, ok)
        salient = rank_desc(att, ok) < plan["salient"].unsqueeze(-1)
        pool = ~salient if dense else ok & ~salient
        if not dense:
            salient &= ok
        # 4. Density anchors among the other tokens of each frame.
        dscore = density_scores(xb, pool, gram)
        anchor = pool & (rank_desc(dscore, pool) < plan["anchors"].unsqueeze(-1))

        att_t, salient_t, anchor_t = to_tokens(att, 0.0), to_tokens(salient, False), to_tokens(anchor, False)
        # The budget left over by the official counts: best remaining salient scores, video-wide.
        rest = ~(salient_t | anchor_t) if full else valid & ~salient_t & ~anchor_t
        topped = rest & (rank_desc(att_t, rest) < plan["topup"].unsqueeze(1))
        kept = salient_t | anchor_t | topped

        t = int(counts.max()) if context.uniform_count is None else context.uniform_count
        slots = ops.slot_mask(counts, t)
        indices = first_true(kept.to(torch.uint8), t, None if full else slots)
        # 5. DTM: the non-salient tokens merge into the anchors.
        is_anchor = anchor_t.gather(1, indices.clamp(min=0)) & slots
        seg_t, multi_t = seg.gather(1, frame), plan["multi"].gather(1, frame)
        norms = None if gram is None else to_tokens(gram_norms(gram), 1.0)
        merge_pool = ~(salient_t | topped) if full else valid & ~salient_t & ~topped
        merged, sizes, joined = merge_into_anchors(
            x, indices, is_anchor, merge_pool, frame, seg_t, multi_t,
            ~kept if full else valid & ~kept, frames, self.params.beta, norms,
        )
        info = {
            "segment": seg,
            "frame_similarity": sim,
            "frame_retention": plan["retain"],
            "multi_frame": plan["multi"],
            "salient_scores": att_t,
            "density_scores": to_tokens(dscore, 0.0),
            "salient": salient_t,
            "anchor": anchor_t,
            "topped_up": topped,
            "joined": joined,
        }
        features = unscale(merged, scale, tokens.dtype)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)

    def _frames(self, context) -> int:
        frames = context.frames
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise InvalidInputError(
                f"{self.name}: context.frames must be an int >= 1 (frames per video), got {frames!r}"
            )
        return frames

    def _frame_index(self, context, b: int, n: int) -> torch.Tensor:
        fi = context.frame_index
        if tuple(fi.shape) != (b, n) or fi.dtype.is_floating_point or fi.dtype == torch.bool:
            raise InvalidInputError(
                f"{self.name}: context.frame_index must be an integer tensor of shape (B, N)=({b}, {n}), "
                f"got {fi.dtype} {tuple(fi.shape)}"
            )
        return fi

    def _checked_frames(self, fi: torch.Tensor, valid: torch.Tensor, frames: int) -> torch.Tensor:
        if host_reads_free(fi):  # checked where reading it costs no device sync
            bad = valid & ((fi < 0) | (fi >= frames))
            if bool(bad.any()):
                raise InvalidInputError(
                    f"{self.name}: context.frame_index must lie in 0..frames-1 = 0..{frames - 1} at valid tokens, "
                    f"got {int(fi[bad][0])}"
                )
        return fi.clamp(0, frames - 1).masked_fill(~valid, 0)


def _block_softmax(logits: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the used slots of each frame block (0 elsewhere; an empty frame is all 0).
    ``ok=None``: every slot is used (finite logits: no masking)."""
    if ok is None:
        e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    else:
        top = logits.masked_fill(~ok, float("-inf")).amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(logits - top) * ok
    return e / e.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
