"""``holitom``: HoliTom's outer-LLM video merging (redundancy-aware temporal segmentation, temporal
and spatial merging) and ``holitom-llm``: its inner-LLM merging at a decoder layer."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tokenreduce import FRAMES, AttentionRows, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale, unscale
from tokenreduce.sync import host_reads_free

from .fastv import attention_scores
from .holitom_ops import (
    adjacent_similar,
    allocation_order,
    dpc_clusters,
    merge_clusters,
    pair_similar,
    segment_lengths,
    segment_starts,
    self_attention_received,
    static_runs,
    window_gains,
)
from .prunevid_cluster import constant, first_true, gram_distances, position_gram, positions
from .ranking import stable_rank

#: ``context.extra`` key of the official ranking signal, when a caller or adapter has it: ``(B, N)``
#: the attention each token receives in the vision tower's selected layer (averaged over heads
#: and query tokens, pooled like the features).
ATTENTION_KEY = "received_attention"

PUBLISHED_TAU = 0.8  # official T (0.65 with RETAIN_RATIO 0.10)
PUBLISHED_BETA = 0.6
PUBLISHED_K = 7
PUBLISHED_MAX_WINDOW = 1024
#: Inner-LLM merging: official HOLITOM_k = 18 (the input of layer 18, ranked by layer 17's
#: attention) and HOLITOM_r = 0.5 (half of the image tokens merged away).
PUBLISHED_LLM_LAYER = 18
PUBLISHED_LLM_KEEP = 0.5

# Allocation keys (see HoliTom docstring, "Budget"): a slot is taken before a later one.
_RESTORE_KEY = 2.0  # above every threshold in [0, 1): only once every regular slot is taken


class HoliTomParams(ReducerParams):
    tau: float = Field(
        default=PUBLISHED_TAU,
        ge=-1.0,
        le=1.0,
        description="A token is static between two frames when the cosine similarity at its position is above "
        "tau (official T: 0.8; 0.65 in the published 10% setting).",
    )
    beta: float | None = Field(
        default=PUBLISHED_BETA,
        ge=0.0,
        le=1.0,
        description="Weight of a static cluster's centre in its merged token: beta * centre + (1 - beta) * "
        "mean(other members) (official BETA 0.6). None: the plain mean of centre and members (official NO_BETA=1).",
    )
    k: int = Field(
        default=PUBLISHED_K,
        ge=1,
        description="Neighbours of the DPC-kNN density used to cluster static tokens (official K 7; "
        "min(k, clusters) is used).",
    )
    max_window: int = Field(
        default=PUBLISHED_MAX_WINDOW,
        ge=1,
        description="Longest temporal segment, in frames (official MAX_WINDOW_SIZE 1024; 1: no temporal merging).",
    )


class HoliTom(Reducer):
    """HoliTom: merge each temporal segment's static tokens over time and cluster them; keep each frame's most attended others.

    For one whole video per row (``context.frames = T``; ``N = T * n`` tokens, frame after
    frame; ``video_budget: per_video``), as the official outer-LLM step on LLaVA-OneVision:

    1. Similarity: a position is *similar* between frames ``t`` and ``t+1`` when the cosine
       similarity of its two tokens is above ``tau``.
    2. Segmentation: merging the tokens static over frames ``s..e`` (similar at every step)
       removes ``(e - s) x`` their number. A dynamic programme over the frames picks the
       partition into segments (at most ``max_window`` frames long) that removes the most
       (official ``select_static_windows``; on equal totals the shorter last segment).
    3. Temporal merging: in each segment of 2+ frames, each static position becomes one
       token, the mean over the segment's frames, at the segment's first frame.
    4. Budget: with ``S`` tokens left, every group keeps the same share ``rho`` of its
       tokens: each frame ``ceil(n_dynamic * rho)`` dynamic tokens, each segment
       ``round(n_static * rho)`` static tokens (official ``retain_ratio / ((N - removed) / N)``,
       capped at 1).
    5. Dynamic tokens: each frame keeps its most attended ones (attention, see below).
    6. Static tokens: each segment's static tokens are clustered by DPC-kNN
       (:func:`~tokenreduce_plugins.holitom_ops.dpc_clusters`, ``k = min(k, clusters)``),
       each cluster merged into its centre, ``beta * centre + (1 - beta) * mean(others)``.

    Budget. The official count follows from a ratio ``r`` (``RETAIN_RATIO``): the sum over
    groups of ``ceil``/``round`` of ``n * rho`` with ``rho = r N / S``, slightly above
    ``r N``. Here the budget ``T`` is exact: every group's tokens are slots with a threshold
    (``j / n`` for a frame's dynamic token of attention rank ``j``, from 0, active when
    ``rho`` exceeds it; ``(j + 0.5) / n`` for a segment's static slot ``j``, Python's half-to-even rule
    on equality) and the ``T`` slots of lowest threshold are taken (ties: by index). Any
    ``rho`` takes a prefix of that order, so when ``T`` is the official count of ``r`` the
    official groups' counts (and so the official tokens) come out. If ``T`` exceeds ``S``
    (budgets above what temporal merging leaves), the averaged-away copies of static
    tokens are kept as they are too, in index order, and each static token averages its
    remaining copies only. A ratio budget ``r`` keeps ``r N`` tokens, rounded half up.

    Attention. The official ranking of dynamic tokens is the attention each token
    receives in the vision tower's selected layer (averaged over heads and all queries,
    pooled like the features). No adapter provides that map; a caller that has it passes it
    as ``context.extra["received_attention"]`` ``(B, N)``. Otherwise the stand-in is the
    attention each token receives within its frame with the tokens themselves as queries
    and keys, ``softmax(X X^T / sqrt(D))`` averaged over the frame's queries.

    Deviations from the official code (github.com/cokeshao/HoliTom, ``holitom/llava_arch.py``):

    * The ranking signal above (a stand-in unless ``received_attention`` is given).
    * The exact budget and its allocation above; over-budget restoration is not official.
    * DPC density ties (the official code breaks them with ``1e-6 * rand`` noise: at random
      when a segment keeps one or two static tokens, where ``k = 1`` or mutual nearest
      neighbours make every density equal) go to the earlier token; equal scores likewise.
      Distances are computed directly on CPU, not through the ``mm`` form ``cdist`` uses for
      more than 25 tokens (bit-identical rows alone and in a batch).
    * On CUDA (cost, issue 19; :func:`tokenreduce.ops.cuda_formulas`) the similarities come
      from Gram matrices (each position's tokens over the frames; each frame's tokens, which
      also give the stand-in attention's logits; TF32 as other similarities) and the DPC
      distances from the Gram matrix of each segment's sums of static copies (full float32);
      a merged static token is the centre's sum times its weight plus one product of the
      members' sums with their weights, computed at the kept slots only. The same method up
      to rounding: a near-tie (a similarity at ``tau``, equal densities or scores) can
      resolve differently than on CPU, which keeps the elementwise forms and direct distances.
      With Triton, the stable sorts that rank tokens, the scale and the clustering after the
      densities run as fused kernels (:mod:`tokenreduce_plugins.ranking`): the same results,
      except that equal keys ``-0.0`` and ``+0.0`` keep their positions as on CPU (CUDA's
      radix sort puts ``-0.0`` first).
    * Token order: every kept token stays at its place in the video (a static token at its
      segment's first frame), so indices are ascending, as the official ``grid`` newline
      layout (LLaVA-Video) orders them; the official ``one_token`` layout (LLaVA-OneVision)
      puts each segment's static tokens before its dynamic ones.
    * The official ``D`` (a share of each frame's dynamic budget given to DPC-merged
      "contextual" tokens) is not implemented: any ``D > 0`` fails in the official code
      (``pos.masked_select(mask.unsqueeze(-1))`` broadcasts to the wrong shape); ``D = 0`` is
      its default and every published setting.
    * Batched: each row is its own video; the official code reuses the previous video's
      adjusted ratio for the next video of a batch. Padded tokens are never static, kept or
      merged. Float32 throughout; rows of extreme magnitude are rescaled by a power of two
      first (:func:`tokenreduce.numerics.safe_scale`).

    Context: ``frames`` (whole videos, ``video_budget: per_video``); all of a video's
    tokens must be present (run it as the first step on the video): ``N`` must be a
    multiple of ``frames`` and ``frame_index``, when given, must be the frame-after-frame
    layout. Stages: ``projector`` (published: the pooled, projected frames of
    LLaVA-OneVision / LLaVA-Video) and ``vision_encoder``.

    The inner-LLM part of HoliTom is :class:`HoliTomLLM` (``holitom-llm``), a second step.

    Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language
    Models", NeurIPS 2025, arXiv:2505.21334. Official code: https://github.com/cokeshao/HoliTom
    """

    name = "holitom"
    stages = frozenset({Stage.PROJECTOR, Stage.VISION_ENCODER})
    Params = HoliTomParams
    requires = (FRAMES,)
    # Every size is host-known (frames, tokens per frame, uniform_count); the loops over frames
    # in holitom_ops never read the device: replayed from a CUDA graph (tokenreduce.graphs).
    graph_safe = True
    paper = (
        'Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", NeurIPS 2025, '
        "arXiv:2505.21334 (github.com/cokeshao/HoliTom)"
    )

    def _layout(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> tuple[int, int]:
        b, n_all, _ = tokens.shape
        t = context.frames
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise InvalidInputError(f"holitom: context.frames must be an int >= 1 (frames per video), got {t!r}")
        if n_all % t:
            raise InvalidInputError(
                f"holitom: the {n_all} tokens per row are not {t} whole frames (context.frames={t}); HoliTom needs "
                "every token of the video, frame after frame: run it as the first step on the video"
            )
        n = n_all // t
        fi = context.frame_index
        if fi is not None and host_reads_free(fi):  # checked where reading it costs no device sync
            expected = torch.arange(n_all).div(n, rounding_mode="floor").expand(b, n_all)
            if tuple(fi.shape) != (b, n_all) or bool(((fi.cpu() != expected) & valid.cpu()).any()):
                raise InvalidInputError(
                    "holitom: context.frame_index is not the frame-after-frame layout of whole frames (an earlier "
                    "step removed tokens?); HoliTom needs every token of the video: run it as the first step"
                )
        return t, n

    def _attention(self, x, valid, context, full, frame_gram) -> torch.Tensor:
        b, t, n, _ = x.shape
        given = context.extra.get(ATTENTION_KEY)
        if given is None:
            return self_attention_received(x, None if full else valid, frame_gram)
        if not isinstance(given, torch.Tensor) or tuple(given.shape) != (b, t * n):
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise InvalidInputError(
                f'holitom: context.extra["{ATTENTION_KEY}"] must be a (B, N)=({b}, {t * n}) tensor, got {got}'
            )
        att = given.to(x.device).float().view(b, t, n)
        if host_reads_free(att) and not bool(torch.isfinite(att[valid]).all()):
            raise InvalidInputError(f'holitom: context.extra["{ATTENTION_KEY}"] has non-finite values at valid tokens')
        return att

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        t_frames, n = self._layout(tokens, valid, context)
        b, n_all, d = tokens.shape
        dev = tokens.device
        p = self.params
        full = context.uniform_count is not None  # no mask: every token valid, no masking passes
        fast = ops.cuda_formulas(tokens)
        xs, scale = safe_scale(tokens, None if full else valid)
        x = xs.view(b, t_frames, n, d)
        ok = valid.view(b, t_frames, n)
        frame = positions(t_frames, dev).view(1, -1, 1)

        # 1-3: segments and static tokens.
        similar = adjacent_similar(position_gram(x), ok, p.tau) if fast else pair_similar(x, ok, p.tau)
        run = static_runs(similar)
        start = segment_starts(window_gains(run), p.max_window)  # (B, T)
        length = segment_lengths(start)
        run_from_start = run.gather(1, start.unsqueeze(-1).expand(b, t_frames, n))
        # Static: similar over the whole segment, of 2+ frames (a tabled threshold per length).
        static = run_from_start >= constant("holitom_static_run", t_frames, dev, lambda: _static_runs(t_frames, dev))[
            length
        ].unsqueeze(-1)
        if not full:
            static &= ok
        first = frame == start.unsqueeze(-1)  # (B, T, 1): the frame opens its segment
        members = static & first  # a segment's static tokens, at its first frame
        dynamic = ~static if full else ok & ~static

        # 4: the allocation keys (class docstring, "Budget").
        frame_gram = torch.matmul(x, x.transpose(-1, -2)) if fast else None  # (B, T, n, n)
        att = self._attention(x, ok, context, full, frame_gram)
        ranked = att.masked_fill(static if full else ~dynamic, float("-inf"))
        att_rank = stable_rank(ranked, descending=True)
        # A frame without dynamic tokens (members) never selects the quotient by 0 below.
        n_dyn = dynamic.sum(dim=-1, keepdim=True, dtype=torch.float64)
        n_static = members.sum(dim=-1, keepdim=True, dtype=torch.float64)
        member_count = members.cumsum(dim=-1)  # the member's rank + 1
        restore_key, unit, parity, n_long, none = constant("holitom_keys", n, dev, lambda: _key_tables(n, dev))
        # Valid tokens are dynamic, a segment's static token (at its first frame) or a copy of one.
        # (2 rank + 1) / (2 n_static) as (rank + 0.5) / n_static: the same rational, rounded once.
        key = torch.where(dynamic, att_rank / n_dyn, torch.where(first, (member_count - 0.5) / n_static, restore_key))
        if not full:
            key = key.masked_fill(~ok, float("inf"))
        # round() rounds half to even: the k-th static slot (0-based) is taken at equality iff k is odd.
        odd = parity[member_count] * members
        # Distinct keys (j / n_dyn, (r + 0.5) / n_static, 2, inf) differ by at least 1 / (2 n^2).
        rank = allocation_order(key.view(b, n_all), odd.view(b, n_all), separation=0.5 / n**2)
        taken = rank < counts.unsqueeze(1)
        taken = taken.view(b, t_frames, n) if full else taken.view(b, t_frames, n) & ok

        # 5-6: dynamic tokens kept by attention rank (a prefix of each frame's slots); static clusters.
        # On bools a > b is a & ~b: one kernel.
        restored = taken & (static > first)
        clusters = (taken & members).sum(dim=-1)  # (B, T), 0 except at segments' first frames
        in_mean = static > restored  # restored copies are static
        # weights[b, s, t, p]: frame t's copy of position p is averaged into the static token of the
        # segment opening at frame s (a matmul: deterministic on every device, unlike scatter-adds).
        in_segment = start.unsqueeze(1) == frame.view(1, -1, 1)  # (B, S, T)
        groups = b * t_frames
        if fast:
            # Each segment's sums of its static copies and their Gram matrix; the means' Gram over
            # sqrt(D) is that times 1 / (copies sqrt(D)) on both sides (tabled per copy count).
            in_segment_f, in_mean_f = in_segment.float(), in_mean.float()
            copies = torch.matmul(in_segment_f, in_mean_f.view(b, t_frames, n))  # (B, T, n)
            sums = torch.einsum("bst,btpd->bspd", in_segment_f, x * in_mean_f.unsqueeze(-1))
            mean_gram = ops.gram(sums)  # full float32 (cancelled against the norms: no TF32)
            inv = constant(f"holitom_inv_copies/{d}", t_frames, dev, lambda: _inv_counts(t_frames, d, dev))
            coef = inv[copies.long()]
            dist = gram_distances((mean_gram * coef.unsqueeze(-1) * coef.unsqueeze(-2)).view(groups, n, n))
            means = None
        else:
            weights = (in_segment.unsqueeze(-1) & in_mean.unsqueeze(1)).float()
            copies = weights.sum(dim=2)  # (B, T, n)
            means = torch.einsum("bstp,btpd->bspd", weights, x) / copies.clamp(min=1).unsqueeze(-1)
            dist = None
        centre, assign = dpc_clusters(
            None if means is None else means.reshape(groups, n, d),
            members.reshape(groups, n),
            clusters.reshape(groups),
            clusters.reshape(groups),  # neighbours: min(k, clusters), capped below
            dist=dist,
            max_neighbours=p.k,
        )
        centre, assign = centre.view(b, t_frames, n), assign.view(b, t_frames, n)
        # Taken valid tokens are dynamic, restored copies or members (which become the centres).
        keep = (taken > members) | centre

        t_out = context.uniform_count if context.uniform_count is not None else int(counts.max())
        slots = ops.slot_mask(counts, t_out)
        indices = first_true(keep.view(b, n_all).to(torch.uint8), t_out, None if full else slots)
        at = indices.clamp(min=0)
        is_centre = centre.view(b, n_all).gather(1, at)  # (B, T_out): the slot holds a merged static token
        kept = xs.gather(1, at.unsqueeze(-1).expand(b, t_out, d))
        if fast:
            merged, merged_sizes = self._merge_by_products(sums, keep, at, centre, assign, copies, t_out)
        else:
            merged, merged_sizes = merge_clusters(
                means.reshape(groups, n, d),
                centre.view(groups, n),
                assign.view(groups, n),
                copies.view(groups, n),
                p.beta,
            )
            merged = ops.gather_rows(merged.view(b, n_all, d), at)
            merged_sizes = merged_sizes.view(b, n_all).gather(1, at)
        features = torch.where(is_centre.unsqueeze(-1), merged, kept)
        sizes = torch.where(is_centre, merged_sizes, unit)  # a kept token stands for itself
        info: dict[str, Any] = {
            "segment_start": start,
            "static": static.reshape(b, n_all),
            "attention": att.reshape(b, n_all),
            "merged_into": self._merged_into(assign, in_mean > keep, start, n_long, none),
        }
        return make_reduction(
            tokens, indices, slots, features=unscale(features, scale, tokens.dtype), sizes=sizes, info=info
        )

    def _merge_by_products(self, sums, keep, at, centre, assign, copies, t_out):
        """The CUDA form of :func:`~tokenreduce_plugins.holitom_ops.merge_clusters` at the kept slots:
        ``(features (B, T_out, D), sizes (B, T_out))`` (used where a slot holds a centre).

        ``sums (B, T, n, D)``: each group's (segment's) sums of its static copies. A centre's token
        is ``own * sum_centre + other * (sum over its other members of sum_m / copies_m)``, the
        members' part one product of 0/1 rows scaled by ``1 / copies_m``; ``own`` and ``other``
        follow from the count of other members (``beta``, or the plain mean without it).
        """
        b, t, n, d = sums.shape
        dev = sums.device
        flat = sums.reshape(b, t * n, d)
        # Each other member's centre token (group at frame s: token s n + its centre's position).
        start_of = constant(f"group_start/{n}", t, dev, lambda: (positions(t, dev) * n).view(1, t, 1))
        joins = (start_of + assign).view(b, -1)
        not_other = ((assign < 0) | centre).view(b, -1)  # no member, or the centre itself
        slot_of = keep.view(b, -1).cumsum(dim=1) - 1  # ascending slot of each kept position
        dest = slot_of.gather(1, joins.clamp(min=0)).masked_fill(not_other, -1)
        hit = torch.empty(b, t_out, t * n, device=dev)
        torch.eq(dest.unsqueeze(1), positions(t_out, dev).view(1, t_out, 1), out=hit)  # (B, T_out, T n), 0/1
        size = copies.view(b, -1)
        inv_size = size.clamp(min=1).reciprocal()
        with ops.full_float32(dev):  # sums of features; of copy counts (exact)
            members = torch.bmm(hit * inv_size.unsqueeze(1), flat)
            member_copies = torch.bmm(hit, size.unsqueeze(-1)).squeeze(-1)
        count = hit.sum(dim=2)
        centre_inv = inv_size.gather(1, at)
        beta = self.params.beta
        if beta is None:  # the mean of the centre's and its members' means
            other = (1.0 + count).reciprocal()
            own = other * centre_inv
        else:
            weights = constant(f"holitom_beta/{beta!r}", 0, dev, lambda: _beta_weights(beta, dev))
            own = torch.where(count > 0, weights[0], weights[1]) * centre_inv
            other = weights[2] / count.clamp(min=1)
        centre_sums = flat.gather(1, at.unsqueeze(-1).expand(b, t_out, d))
        merged = torch.addcmul(other.unsqueeze(-1) * members, own.unsqueeze(-1), centre_sums)
        # The copies a merged token stands for: its centre's and its other members'.
        return merged, size.gather(1, at) + member_copies

    @staticmethod
    def _merged_into(assign, merged, start, n, none) -> torch.Tensor:
        """``(B, N)``: for each merged-away static copy (``merged``), the index of the token it went into
        (``none``, -1: none); ``n`` the tokens per frame (both long 0-d tensors)."""
        b, t, per = assign.shape
        at_start = assign.gather(1, start.unsqueeze(-1).expand(b, t, per))  # its position's centre, in its segment
        target = torch.addcmul(at_start, start.unsqueeze(-1), n)
        return torch.where(merged & (at_start >= 0), target, none).reshape(b, t * per)


def _static_runs(t: int, device: torch.device) -> torch.Tensor:
    """``(T + 1,)`` long, per segment length ``W``: the similar steps from its first frame that make a
    position static, ``W - 1``; none can (``T + 1``) below 2 frames."""
    w = torch.arange(t + 1, device=device)
    return torch.where(w >= 2, w - 1, t + 1)


def _key_tables(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Constants of :meth:`HoliTom.reduce` (0-d tensors, not fills per call): the restoration key
    (float64), 1.0, ``(c - 1) % 2`` for ``c = 0 .. n`` (a member's rank parity from its running
    count), ``n`` and -1 (long)."""
    # Fills, not copies of host data (torch.tensor): these may be made during a CUDA graph capture.
    long = {"dtype": torch.long, "device": device}
    return (
        torch.full((), _RESTORE_KEY, dtype=torch.float64, device=device),
        torch.full((), 1.0, device=device),
        (torch.arange(n + 1, **long) - 1) % 2,
        torch.full((), n, **long),
        torch.full((), -1, **long),
    )


def _beta_weights(beta: float, device: torch.device) -> torch.Tensor:
    """``(3,)`` float32: ``beta``, 1 and ``1 - beta`` (fills, as :func:`_key_tables`)."""
    return torch.stack([torch.full((), v, device=device) for v in (beta, 1.0, 1.0 - beta)])


def _inv_counts(t: int, d: int, device: torch.device) -> torch.Tensor:
    """``(T + 1,)`` float32: ``1 / (max(c, 1) sqrt(D))`` per copy count ``c``."""
    return 1.0 / (torch.arange(t + 1, device=device).clamp(min=1) * d**0.5)


class HoliTomLLM(Reducer):
    """HoliTom inner-LLM merging: keep the most attended image tokens, average each other one into its most similar kept one.

    At decoder layer ``K`` (published: ``K = 18`` of LLaVA-OneVision-7B's 28, ``r = 0.5``):
    the image tokens are ranked by the attention the last token paid them in layer ``K-1``
    (averaged over heads); the top ``round(N (1 - r))`` are kept; every other image token is
    merged into the kept token whose hidden state is most cosine-similar, in index order,
    each merge halving: ``h <- (h + x) / 2`` (so a kept token with merged tokens ``x_1 ..
    x_m`` ends as ``h / 2^m + sum_j x_j / 2^(m - j + 1)``). The budget is the kept count: a
    ratio budget ``1 - r`` rounds half to even as the official ``round``.

    Context (``llm_layer``): ``attention`` as ``AttentionRows(query="last",
    layer="previous")`` (layer ``K-1``'s row, recomputed by the adapter from q/k,
    so the model keeps its fast attention kernel; the official code asks layer ``K-1`` for the
    eager attention map).

    Deviations from the official code (github.com/cokeshao/HoliTom, ``holitom/modeling_qwen2.py``,
    ``Qwen2Model_holitom.forward``):

    * Per row: the official code ranks every row by the first row's attention (batch 1).
    * Equal attention goes to the lower index (``torch.topk`` leaves ties unordered);
      equal similarity to the kept token of higher attention, as the official argmax over
      the top-k order.
    * Float32 merging (the official code merges in the model's dtype, one rounding per merge).
      On CUDA the cosine similarities are the tokens' product over both norms
      (:func:`tokenreduce.ops.cosine_similarity`): equal up to rounding (a near-tie may
      resolve differently).
    * Where the adapter's image tokens are counted: the official image span of LLaVA-OneVision
      includes the video's newline token.

    Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language
    Models", NeurIPS 2025, arXiv:2505.21334. Official code: https://github.com/cokeshao/HoliTom
    """

    name = "holitom-llm"
    stages = frozenset({Stage.LLM_LAYER})
    requires = (AttentionRows(query="last", layer="previous"),)
    ratio_rounding = "half_even"  # official: round(N * (1 - r))
    graph_safe = True  # the selection and the halving merge are fixed-size: no host read
    paper = HoliTom.paper

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        b, n, _ = tokens.shape
        dev = tokens.device
        scores = attention_scores(context.attention, tokens, self.name)
        if host_reads_free(scores) and not bool(torch.isfinite(scores[valid]).all()):
            raise InvalidInputError("holitom-llm: context.attention has non-finite values at valid image tokens")
        t = context.uniform_count if context.uniform_count is not None else int(counts.max())
        order, slots = ops.topk_per_row(scores, counts, valid, t)  # descending attention
        indices = ops.ascending(order, slots)
        keep = ops.keep_mask_from(indices, slots, n)
        x, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)
        # Most similar kept token, searched in attention order (the official argmax over the top-k).
        sim = ops.cosine_similarity(x, ops.gather_rows(x, order)).masked_fill(~slots.unsqueeze(1), float("-inf"))
        # (B, N) position of the chosen kept token (a row keeping nothing has -1 slots: clamped, never used)
        target_pos = order.gather(1, sim.argmax(dim=2)).clamp(min=0)
        slot_of = (keep.long().cumsum(dim=1) - 1).clamp(min=0)  # ascending slot of each kept position
        dropped = valid & ~keep & slots.any(dim=1, keepdim=True)
        target = torch.where(dropped, slot_of.gather(1, target_pos), -1)
        # Sequential halving: a merged token's weight is 2^-(1 + merges into the same slot after it).
        # Merges into each slot (integer adds: deterministic in any order); spare column t: none.
        m = torch.zeros(b, t + 1, dtype=torch.long, device=dev).scatter_add_(1, target % (t + 1), dropped.long())[:, :t]
        pos = positions(n, dev).expand(b, n)
        key = torch.where(dropped, target * (n + 1) + pos, (t + 1) * (n + 1))
        sorted_at = torch.empty_like(pos).scatter_(1, torch.sort(key, dim=1).indices, pos)
        group_start = m.cumsum(dim=1) - m
        tgt = target.clamp(min=0)
        later = m.gather(1, tgt) - 1 - (sorted_at - group_start.gather(1, tgt))
        weight = torch.where(dropped, torch.exp2(-(later + 1).float()), 0.0)
        sums, _ = ops.merge_into(x, target, t, token_weight=weight)
        kept = ops.gather_rows(x, indices)
        features = kept * torch.exp2(-m.float()).unsqueeze(-1) + sums
        info = {"scores": scores, "merged_into": torch.where(dropped, target_pos, -1)}
        return make_reduction(
            tokens,
            indices,
            slots,
            features=unscale(features, scale, tokens.dtype),
            sizes=(1 + m).float(),
            info=info,
        )
