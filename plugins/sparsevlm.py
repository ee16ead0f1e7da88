"""``sparsevlm``: text-guided visual token sparsification with token recycling, inside the decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from tokenreduce import TEXT, AttentionRows, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import ConfigError, InvalidInputError
from tokenreduce.numerics import safe_scale, unscale
from tokenreduce.pipeline import Pipeline, Step
from tokenreduce.sync import host_reads_free

#: The official pruning layers on LLaVA-1.5 are 2, 6 and 15 (``pruning_loc``): each prunes
#: the *output* of that layer, ranked by that layer's attention. Here a step at layer K
#: reduces the input of layer K with layer K-1's attention, so the same schedule is 3, 7, 16.
PUBLISHED_LAYERS = (3, 7, 16)
#: Official tokens selected at each pruning layer (``score.py`` ``sparse_token_dict``,
#: ``USE_VERSION=1_0``), keyed by the setting's name: the image tokens the decoder layers
#: see on average (counted the official way), not the count after the last step.
PUBLISHED_SELECTED = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
PUBLISHED_RECYCLE_RATIO = 0.3
PUBLISHED_CLUSTER_RATIO = 0.1


class SparseVLMParams(ReducerParams):
    recycle: bool = Field(
        default=True,
        description="Recycle dropped tokens: the best-scored share of them is clustered (DPC-kNN) and each cluster "
        "merged into one token (official merge_flag). False: keep the top-T by rater attention only.",
    )
    recycle_ratio: float = Field(
        default=PUBLISHED_RECYCLE_RATIO,
        ge=0.0,
        le=1.0,
        description="Share of the dropped tokens that is recycled, by score: r = floor(dropped * ratio) + 1 "
        "(official 0.3, 'top 30%').",
    )
    cluster_ratio: float = Field(
        default=PUBLISHED_CLUSTER_RATIO,
        ge=0.0,
        le=1.0,
        description="Clusters per recycled token: c = floor(r * ratio) + 1 (official 1/10).",
    )


def recycle_counts(dropped: int, recycle_ratio: float, cluster_ratio: float) -> tuple[int, int]:
    """``(r, c)``: recycled tokens and clusters when ``dropped`` tokens are dropped (official formulas).

    ``int(dropped * 0.3) + 1`` and ``int(r / 10) + 1`` in the official code; both capped so
    that ``c <= r <= dropped``. Host-side twin of :func:`split_budget` (same float64 products).
    """
    if dropped <= 0:
        return 0, 0
    r = min(int(dropped * recycle_ratio) + 1, dropped)
    return r, min(int(r * cluster_ratio) + 1, r)


def step_budgets(
    selected: Sequence[int],
    n_image: int,
    recycle_ratio: float = PUBLISHED_RECYCLE_RATIO,
    cluster_ratio: float = PUBLISHED_CLUSTER_RATIO,
) -> tuple[int, ...]:
    """Per-step budgets (selected + clusters) of an official schedule of ``selected`` counts.

    The official code keeps ``min(selected, N - 1)`` of the ``N`` image tokens present, then
    adds ``c`` recycled cluster tokens; the next step starts from that many.
    """
    out, n = [], n_image
    for s in selected:
        k = min(s, n - 1)
        n = k + recycle_counts(n - k, recycle_ratio, cluster_ratio)[1]
        out.append(n)
    return tuple(out)


def split_budget(
    counts: torch.Tensor, n_valid: torch.Tensor, n_max: int, recycle_ratio: float, cluster_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, r, c)`` per row: selected, recycled and cluster counts for a total of ``counts``.

    ``f(k) = k + c(k)`` (``c`` from :func:`recycle_counts` with ``N - k`` dropped) grows by 0
    or 1 per step of ``k`` and ``f(N) = N``, so the largest ``k`` with ``f(k) <= T`` has
    ``f(k) = T`` whenever ``f(0) <= T``; the largest also reproduces every official
    schedule where two ``k`` give the same total. Below ``f(0)`` (tiny budgets) ``k = 0`` and
    all ``T`` are clusters. Evaluated for every ``k`` at once: ``(B, n_max + 1)``, no host read.
    """
    k = torch.arange(n_max + 1, device=counts.device)
    dropped = (n_valid.unsqueeze(1) - k).clamp(min=0)
    # float64 products: the official int(dropped * 0.3) is a float64 product in Python.
    r = torch.minimum((dropped.double() * recycle_ratio).floor().long() + 1, dropped)
    c = torch.minimum((r.double() * cluster_ratio).floor().long() + 1, r)
    ok = (k + c <= counts.unsqueeze(1)) & (k <= n_valid.unsqueeze(1))
    sel = torch.where(ok, k, torch.full_like(k, -1)).amax(dim=1).clamp(min=0)
    return sel, r.gather(1, sel.unsqueeze(1)).squeeze(1), counts - sel


def select_raters(
    image: torch.Tensor, valid: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """``(B, L)`` bool: the text "raters", text tokens more relevant to the image than average.

    Official rule: ``R = softmax_text(H_v H_t^T)`` (no scaling), relevance of a text token =
    its mean over the image tokens, raters = relevance strictly above the mean relevance.
    Padding (image or text) takes no part. If no text token is above the mean (all equal,
    e.g. a single text token) every valid text token rates (the official code would average
    over no rows and get NaN).
    """
    v, t = image.float(), text.float()
    logits = v @ t.transpose(1, 2)  # (B, N, L)
    logits = logits.masked_fill(~text_mask.unsqueeze(1), torch.finfo(torch.float32).min)
    rel = torch.softmax(logits, dim=2) * text_mask.unsqueeze(1)
    rel = rel.masked_fill(~valid.unsqueeze(2), 0).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (rel * text_mask).sum(dim=1, keepdim=True) / text_mask.sum(dim=1, keepdim=True).clamp(min=1)
    raters = text_mask & (rel > mean)
    return torch.where(raters.any(dim=1, keepdim=True), raters, text_mask)


def rater_scores(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` mean attention of the rater rows of ``attention (B, L, N)`` to each image token."""
    w = raters.to(attention.device).float()
    return (attention.float() * w.unsqueeze(2)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1)


def dpc_knn_clusters(x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, c_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x (B, R, D)`` (the official ``cluster_and_merge``), batched.

    Distances ``d = ||x_i - x_j|| / sqrt(D)``; density ``rho_i = exp(-mean of the c smallest
    d_ij^2)`` (itself included); ``delta_i`` = distance to the nearest denser token (the
    largest distance of the row for the densest; equal densities: the earlier token is the
    denser, where the official code breaks ties with random noise); the ``c`` tokens with the largest
    ``rho * delta`` are the centres; every token joins its nearest centre (a centre itself).
    ``mask (B, R)`` marks real tokens, ``c (B,)`` the clusters of each row.

    Returns ``(centres (B, c_max), assign (B, R))``: centre slots in descending
    ``rho * delta`` order (the official order) and each token's centre slot (-1 = padding).
    """
    b, r_max, d = x.shape
    dev = x.device
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    # Direct differences on CPU; on CUDA through one product (ops.euclidean_distances).
    dist = ops.euclidean_distances(x) / d**0.5
    inf = float("inf")  # a Python scalar: a tensor made from it would be a host-to-device copy
    nearest = torch.sort(torch.where(pair, dist, inf), dim=2).values  # ascending; padding last
    first = torch.arange(r_max, device=dev).view(1, 1, -1) < c.view(-1, 1, 1)
    density = torch.exp(-torch.where(first, nearest.square(), 0.0).sum(dim=2) / c.clamp(min=1).view(-1, 1).float())
    # The official code adds 1e-6 * uniform noise to the densities so that no two are equal
    # (with c = 2 mutual nearest neighbours always tie, with c = 1 every token does). A fixed
    # tie-break instead: of equal densities the earlier token (better scored) is the denser.
    idx = torch.arange(r_max, device=dev)
    tie = (density.unsqueeze(1) == density.unsqueeze(2)) & (idx.view(1, 1, -1) < idx.view(1, -1, 1))
    denser = ((density.unsqueeze(1) > density.unsqueeze(2)) | tie) & pair  # [b, i, j]: j denser than i
    dist_max = torch.where(pair, dist, -inf).flatten(1).amax(dim=1).view(-1, 1, 1)
    delta = torch.where(denser, dist, dist_max).amin(dim=2)
    score = torch.where(mask, delta * density, -inf)
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :c_max]
    ok = torch.arange(c_max, device=dev).unsqueeze(0) < c.unsqueeze(1)
    to_centre = torch.where(ok.unsqueeze(1), dist.gather(2, centres.unsqueeze(1).expand(b, r_max, c_max)), inf)
    assign = to_centre.argmin(dim=2) if c_max > 0 else torch.zeros(b, r_max, dtype=torch.long, device=dev)
    # Each centre joins its own cluster (padded centre slots write to a spare column).
    spare = torch.cat([assign, assign.new_zeros(b, 1)], dim=1)
    slot_ids = torch.arange(c_max, device=dev).expand(b, c_max)
    spare.scatter_(1, torch.where(ok, centres, r_max), slot_ids)
    assign = torch.where(mask, spare[:, :r_max], -1)
    return centres, assign


class SparseVLM(Reducer):
    """SparseVLM: keep the image tokens the relevant text tokens attend to; merge some dropped ones into a few recycled tokens.

    At each step (a decoder layer; published for LLaVA-1.5: three of them):

    1. Raters: the text tokens after the image whose relevance to the image is above
       the mean, relevance = ``softmax`` over the text of ``H_v H_t^T``, averaged over
       the image tokens (:func:`select_raters`).
    2. Scores: each image token's attention from the raters, averaged over raters and
       heads (``context.attention``, the text rows, softmax over the full causal row).
    3. The ``k`` best-scored image tokens are kept. Of the dropped ones the best-scored
       ``r = floor(0.3 * dropped) + 1`` are recycled: clustered by DPC-kNN into
       ``c = floor(r / 10) + 1`` clusters (:func:`dpc_knn_clusters`), each merged into
       its mean, which takes the place of the cluster centre. The rest is discarded.

    Budget. ``T`` is the number of image tokens after the step, ``k + c``: the official
    code fixes ``k`` per layer and ``c`` follows from it; here ``T`` is fixed (host-known,
    so the output length is) and ``k`` is the largest with ``k + c(k) = T``
    (:func:`split_budget`). The official schedules (LLaVA-1.5, 576 image tokens) are
    steps at layers 3, 7, 16 with the budgets :func:`step_budgets` gives: "64" (66, 30,
    17 selected) = budgets 82, 32, 18 (``docs/examples/reducers/sparsevlm.yaml``,
    :meth:`schedule`); "96" = 249, 55, 27; "128" = 312, 117, 39; "192" = 309, 204, 113.
    The name is the image-token count averaged over the decoder layers, counted the
    official way, not the count after the last step. For budgets below ``c(0)`` (about
    ``0.03 N``) every kept token is a cluster.

    Adaptive count. The first release (v1.0, Oct 2024) chose ``k = rank(P) * scale +
    bias`` from the rank of the rater x image attention matrix ``P``, read on the host
    (``.item()``): the output length depends on the data. That is not implemented: the
    output length must be host-known and the budget is that number. The official code
    since v1.5 (March 2025, the ICML 2025 version) uses the fixed per-layer counts above,
    which this reproduces.

    Context (``llm_layer``): ``attention`` as ``AttentionRows(query="text", ...)`` (every
    text token after the image; ``text_mask`` marks real rows) and ``layer="previous"``:
    the official step prunes layer K's *output* by layer K's attention,
    which is the input of layer K+1 with the previous layer's attention. The adapter
    recomputes these rows from q/k only, so the model keeps SDPA / FlashAttention (the
    official code computes the full eager map). ``text_embeds``: the text tokens'
    hidden states at the step, for the raters.

    Deviations from the official code (github.com/Gumpest/SparseVLMs, ``main``,
    ``USE_VERSION=1_0``):

    * Raters are selected at every step from that step's inputs (the image tokens being
      reduced and ``context.text_embeds``, the hidden states entering layer K); the
      official code selects them once from the LLM input embeddings and reuses them at
      every layer. The rule is the same; the fixture checks it on embeddings.
    * Each merged token sits at its cluster centre's position (as ModelTC/LightCompress
      does; with ``positions: compact`` it gets that place's position id); the official
      code appends the merged tokens after the kept image tokens, in DPC score order.
    * A merged token is the exact mean of its cluster (official: sum / (n + 1e-6)).
    * Equal DPC densities (every token when ``c = 1``, mutual nearest neighbours when
      ``c = 2``) are ordered by the tokens' scores (the better-scored one is the denser);
      the official code adds ``1e-6 * rand`` noise, a random order. Score ties go to the
      lower index.
    * Budget ``>= N`` keeps every token (official: at least one token is always dropped).
    * Batched with padding masks; the rater threshold is per row over its real text.
      A row with no text after the image scores all its image tokens 0 (keeps the first).
    * Rows whose largest magnitude is outside ``[2^-40, 2^40]`` are rescaled by a power of
      two first (:func:`tokenreduce.numerics.safe_scale`), so no float32 overflow.
    * On CUDA the DPC distances come from one full-float32 product of the centred tokens
      (:func:`tokenreduce.ops.euclidean_distances`) instead of ``torch.cdist``'s direct
      kernel (0.9 ms at batch 8, N = 576): equal up to float32 rounding, so near-equal
      distances or densities can order differently; the rater products run in TF32
      (:mod:`tokenreduce.precision`). CPU computes the differences directly.
    * SparseVLM+ (``USE_VERSION=2_0``: RoPE bias correction, head selection, no merging)
      is not implemented.

    Stages: ``llm_layer`` only (the signal exists only inside the decoder).

    Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference", ICML 2025, arXiv:2410.04417.
    Official code: https://github.com/Gumpest/SparseVLMs
    """

    name = "sparsevlm"
    stages = frozenset({Stage.LLM_LAYER})
    Params = SparseVLMParams
    requires = (AttentionRows(query="text", layer="previous"), TEXT)
    graph_safe = True
    paper = (
        'Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", '
        "ICML 2025, arXiv:2410.04417 (github.com/Gumpest/SparseVLMs)"
    )

    @classmethod
    def schedule(cls, retained: int = 64, *, n_image: int = 576, layers: Sequence[int] = PUBLISHED_LAYERS) -> Pipeline:
        """The official multi-layer pipeline for ``retained`` in 64/96/128/192 (one step per layer)."""
        if retained not in PUBLISHED_SELECTED:
            allowed = ", ".join(map(str, sorted(PUBLISHED_SELECTED)))
            raise ConfigError(f"sparsevlm: retained={retained!r} has no official schedule; allowed: {allowed}")
        if len(layers) != len(PUBLISHED_SELECTED[retained]):
            raise ConfigError(f"sparsevlm: layers must list {len(PUBLISHED_SELECTED[retained])} layers, got {list(layers)}")
        budgets = step_budgets(PUBLISHED_SELECTED[retained], n_image)
        return Pipeline([Step(Stage.LLM_LAYER, cls(t, stage=Stage.LLM_LAYER), layer=k) for k, t in zip(layers, budgets)])

    def _context(self, tokens: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = tokens.shape
        dev = tokens.device
        attention, text = context.attention, context.text_embeds
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != d:
            raise InvalidInputError(
                f"sparsevlm: context.text_embeds must have shape (B, L, D)=({b}, L, {d}) (hidden states of the "
                f"text tokens, the tokens' width), got {tuple(text.shape)}"
            )
        q = text.shape[1]
        if attention.dim() != 3 or tuple(attention.shape) != (b, q, n):
            raise InvalidInputError(
                f"sparsevlm: context.attention must have shape (B, L, N)=({b}, {q}, {n}) (one row per text token "
                f"of text_embeds), got {tuple(attention.shape)}"
            )
        if context.text_mask is None:
            mask = torch.ones(b, q, dtype=torch.bool, device=dev)
        elif tuple(context.text_mask.shape) != (b, q):
            raise InvalidInputError(
                f"sparsevlm: context.text_mask must have shape (B, L)=({b}, {q}), got {tuple(context.text_mask.shape)}"
            )
        else:
            mask = context.text_mask.to(dev).bool()
        return attention.to(dev), text.to(dev), mask

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        attention, text, text_mask = self._context(tokens, context)
        # Without padding (uniform_count set) there is nothing to mask.
        x, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)
        raters = select_raters(x, valid, text, text_mask)
        scores = rater_scores(attention, raters)
        if host_reads_free(scores) and not bool(torch.isfinite(scores[valid]).all()):
            # A NaN would be ranked first by the sort; on CPU the check costs no device sync.
            raise InvalidInputError("sparsevlm: context.attention has non-finite values in the raters' rows")
        out = self._sparsify(tokens, x, scale, scores, counts, valid, context.uniform_count)
        out.info["raters"] = raters
        return out

    def sparsify(
        self, tokens: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int | None = None
    ):
        """Keep ``counts[b]`` tokens: the top-``k`` by ``scores (B, N)`` plus ``c`` recycled clusters.

        Step 3 of the class docstring on given scores. ``t`` is ``counts.max()`` when known
        on the host (no device read then).
        """
        x, scale = safe_scale(tokens, valid)
        return self._sparsify(tokens, x, scale, scores, counts, valid, t)

    def _sparsify(self, tokens, x, scale, scores, counts, valid, t):
        b, n, d = tokens.shape
        dev = tokens.device
        p = self.params
        t = int(counts.max()) if t is None else t
        pos = torch.arange(n, device=dev).expand(b, n)
        scores = scores.float().to(dev)
        order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, pos)
        if p.recycle:
            k, r, c = split_budget(counts, valid.sum(dim=1), n, p.recycle_ratio, p.cluster_ratio)
        else:
            k, r, c = counts, torch.zeros_like(counts), torch.zeros_like(counts)
        selected = valid & (rank < k.unsqueeze(1))
        keep, sizes, merged = selected, selected.float(), None
        recycled = torch.zeros_like(selected)
        merged_into = torch.full((b, n), -1, dtype=torch.long, device=dev)
        # Host-known bounds of r and c over all rows: the recycled tokens go to (B, R, D).
        r_max = min(n, int(n * p.recycle_ratio) + 1) if p.recycle else 0
        c_max = min(r_max, int(r_max * p.cluster_ratio) + 1, t)
        if r_max > 0 and c_max > 0:
            # The recycled tokens: ranks k .. k+r-1, i.e. the best-scored dropped ones, in score order.
            slot = torch.arange(r_max, device=dev).unsqueeze(0)
            rec_ok = slot < r.unsqueeze(1)
            rec_pos = order.gather(1, (k.unsqueeze(1) + slot).clamp(max=n - 1))
            rec_x = ops.gather_rows(x, rec_pos)
            centres, assign = dpc_knn_clusters(rec_x, rec_ok, c, c_max)
            sums, members = ops.merge_into(rec_x, assign, c_max)
            merged = sums / members.clamp(min=1).unsqueeze(-1)
            centre_ok = torch.arange(c_max, device=dev).unsqueeze(0) < c.unsqueeze(1)
            centre_pos = torch.where(centre_ok, rec_pos.gather(1, centres), n)  # padding -> spare column n
            size_buf = torch.cat([sizes, sizes.new_zeros(b, 1)], dim=1)
            sizes = size_buf.scatter(1, centre_pos, members)[:, :n]
            keep = keep | ops.keep_mask_from(centre_pos.clamp(max=n - 1), centre_ok, n)
            recycled = ops.keep_mask_from(rec_pos, rec_ok, n)
            into = torch.where(assign >= 0, centre_pos.gather(1, assign.clamp(min=0)), -1)
            into_buf = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
            merged_into = into_buf.scatter(1, torch.where(rec_ok, rec_pos, n), into)[:, :n]
        slots = ops.slot_mask(counts, t)
        indices = torch.sort(torch.where(keep, pos, n), dim=1).values[:, :t].masked_fill(~slots, -1)
        features = ops.gather_rows(x, indices)
        if merged is not None:
            # Each cluster's mean takes its centre's output slot (the centre's rank among the
            # kept positions; padded centres write to a spare slot t): written into the (B, T, D)
            # output, not into a copy of all (B, N, D) tokens.
            rank_kept = keep.long().cumsum(dim=1) - 1
            centre_slot = torch.where(centre_ok, rank_kept.gather(1, centre_pos.clamp(max=n - 1)), t)
            buf = torch.cat([features, features.new_zeros(b, 1, d)], dim=1)
            features = buf.scatter(1, centre_slot.unsqueeze(-1).expand(-1, -1, d), merged)[:, :t]
        info: dict[str, Any] = {
            "scores": scores,
            "selected": selected,
            "recycled": recycled,
            "merged_into": merged_into,
            "clusters": c,
        }
        return make_reduction(
            tokens,
            indices,
            slots,
            features=unscale(features, scale, tokens.dtype),
            sizes=ops.gather_rows(sizes, indices),
            info=info,
        )
