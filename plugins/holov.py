"""``holov``: holistic pruning, the budget shared out over regions of the image by their scores."""

from __future__ import annotations

import torch
from pydantic import Field

from tokenreduce import CLS_ATTENTION, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.sync import host_reads_free

from .cls_attn import cls_scores

#: Constants of the official ``HoloV`` function: attention is scaled by 1e3 before it is
#: mixed with the similarity variance, and ``esp`` guards the three divisions.
ATTENTION_SCALE = 1e3
EPS = 1e-6


class HoloVParams(ReducerParams):
    regions: int = Field(
        default=16,
        ge=1,
        description="R, the number of regions: contiguous runs of the token sequence (raster order), the first "
        "N mod R of them one token longer. Official LLaVA-1.5 setting: 16 (with T=64).",
    )
    alpha: float = Field(
        default=0.09,
        ge=0.0,
        allow_inf_nan=False,
        description="Weight of the similarity-variance term in a region's score (official: 0.09).",
    )


def region_layout(valid: torch.Tensor, regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes in a ``(B, R', L)`` block layout of the official region split.

    Row ``b``'s ``n`` valid tokens, in order, are cut into ``R`` runs of ``n // R`` tokens,
    the first ``n % R`` runs one longer (runs of 0 tokens, when ``R > n``, are empty).
    ``R' = min(R, N)`` and ``L = ceil(N / R')`` bound every row's runs.

    Returns ``(pos, ok)``: ``pos (B, R', L)`` the token position in each block slot (``N``
    at unused slots) and ``ok`` the used slots.
    """
    b, n = valid.shape
    r_blocks = min(regions, n)
    length = -(-n // r_blocks)
    dev = valid.device
    rank = valid.long().cumsum(dim=1) - 1  # index among the row's valid tokens
    count = valid.sum(dim=1, keepdim=True)
    q, rem = count // regions, count % regions
    long_part = rem * (q + 1)  # tokens in the runs of length q + 1
    region = torch.where(rank < long_part, rank // (q + 1), rem + (rank - long_part) // q.clamp(min=1))
    start = region * q + torch.minimum(region, rem)
    flat = torch.where(valid, region * length + (rank - start), r_blocks * length)  # padding: spare slot
    pos = torch.full((b, r_blocks * length + 1), n, dtype=torch.long, device=dev)
    pos.scatter_(1, flat, torch.arange(n, device=dev).expand(b, n))
    pos = pos[:, :-1].view(b, r_blocks, length)
    return pos, pos < n


def region_scores(x: torch.Tensor, att: torch.Tensor, ok: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(B, R)`` score of each region, the official formula on ``(B, R, L, D)`` blocks.

    Per region of ``m`` tokens: cosine similarities ``S`` (norms ``+ 1e-6``) with the
    diagonal zeroed; per token the mean ``mu_i = sum_j S_ij / (m-1)`` and the spread
    ``v_i = sum_j (S_ij - mu_i)^2 / (m-1)`` (the zeroed diagonal term included, as in the
    official code); ``a = 1e3 * attention``; token score ``a + alpha * v * mean|a| /
    (mean|v| + 1e-6)``; the region's score is the mean token score. A one-token region
    scores its raw (unscaled) attention; an empty one scores 0.
    """
    okf = ok.float()
    m = okf.sum(dim=-1)  # (B, R) tokens per region
    denom = (m - 1).clamp(min=1).unsqueeze(-1)
    norm = x.norm(dim=-1, keepdim=True)
    # Tokens so large that their sum of squares overflows float32 (bfloat16 near its top):
    # divide by the peak first; at that scale the 1e-6 is negligible. Others: the official ops
    # (divided by exactly 1). The peak max|x| as max(max x, -min x): no |x| copy.
    big = ~torch.isfinite(norm)
    lo, hi = torch.aminmax(x.detach(), dim=-1, keepdim=True)  # aminmax has no derivative; only a scale
    x = x / torch.where(big, torch.maximum(hi, -lo), 1.0)
    norm = torch.where(big, x.norm(dim=-1, keepdim=True), norm)
    if ops.cuda_formulas(x):
        # One product, then divided by the norms: no normalised (B, R, L, D) copy.
        scale = norm + EPS
        sim = (x @ x.transpose(-1, -2)).div_(scale).div_(scale.transpose(-1, -2))  # (B, R, L, L)
    else:
        xn = x / (norm + EPS)
        sim = xn @ xn.transpose(-1, -2)  # (B, R, L, L)
    length = x.shape[-2]
    pair = ok.unsqueeze(-1) & ok.unsqueeze(-2) & ~torch.eye(length, dtype=torch.bool, device=x.device)
    sim = sim * pair
    mean = sim.sum(dim=-1) / denom
    var = (((sim - mean.unsqueeze(-1)) ** 2) * okf.unsqueeze(-2)).sum(dim=-1) / denom
    a = att * ATTENTION_SCALE
    mean_a = (a.abs() * okf).sum(dim=-1) / m.clamp(min=1)
    mean_v = (var.abs() * okf).sum(dim=-1) / m.clamp(min=1)
    token = a + alpha * var * (mean_a / (mean_v + EPS)).unsqueeze(-1)
    score = (token * okf).sum(dim=-1) / m.clamp(min=1)
    single = (att * okf).sum(dim=-1)  # m == 1: the official code takes the raw attention
    return torch.where(m > 1, score, torch.where(m == 1, single, torch.zeros_like(score)))


def allocate(scores: torch.Tensor, sizes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, R)`` tokens each region keeps: the official allocation, capped at the region size.

    ``w = s / (sum s + 1e-6)``; ``floor(w T)`` each; the ``T - sum`` left over go one each to
    the highest-weight regions (ties: lower region first). Empty regions take nothing.
    """
    nonempty = sizes > 0
    # Attention is a softmax, so scores are >= 0; clamping keeps sum(alloc) <= T for any input.
    s = scores.clamp(min=0).masked_fill(~nonempty, 0)
    weights = s / (s.sum(dim=1, keepdim=True) + EPS)
    alloc = torch.floor(weights * counts.unsqueeze(1).float()).long()
    left = counts.unsqueeze(1) - alloc.sum(dim=1, keepdim=True)
    order = torch.sort(weights.masked_fill(~nonempty, -1.0), dim=1, descending=True, stable=True).indices
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ar)
    alloc = alloc + ((rank < left) & nonempty).long()
    return torch.minimum(alloc, sizes)


def rank_desc(values: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, highest value first (ties: lower index); unusable last."""
    key = values.masked_fill(~usable, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


class HoloV(Reducer):
    """HoloV: share the budget out over regions of the image by a holistic score, then keep each region's top tokens.

    As the official ``HoloV`` function (LLaVA-1.5 code), per image of ``N`` tokens and budget ``T``:

    1. **Regions.** The token sequence is cut into ``R`` (``regions``, published 16)
       contiguous runs: ``N // R`` tokens each, the first ``N % R`` runs one longer. The
       runs follow the raster order of the flattened patch grid, so for LLaVA-1.5's
       24x24 grid a region is a band of 1.5 patch rows, not a 2-D tile; ``context.grid``
       is not used. With ``R > N`` there are ``N`` one-token regions.
    2. **Region scores.** Inside a region of ``m`` tokens, each token's cosine
       similarities to the others give a mean and a spread ``v_i`` (with the zeroed
       self-similarity counted in the spread, as officially); with ``a = 1e3 *
       cls_attention`` the token scores ``a + alpha * v * mean|a| / (mean|v| + 1e-6)``
       (``alpha`` 0.09) and the region scores their mean. A one-token region scores its
       raw attention.
    3. **Allocation.** Weights ``w = s / (sum s + 1e-6)``; region ``r`` gets
       ``floor(w_r T)`` tokens and the remainder goes one each to the highest weights.
    4. **Selection.** Each region keeps its allocated count of tokens with the highest
       ``cls_attention`` (the spread term steers only the allocation).

    The scores use the features being reduced: at the published ``projector`` stage the
    projected tokens with the [CLS] attention of the selected vision layer (the official
    code prunes after ``mm_projector``); at ``vision_encoder`` the vision features.
    Vectorised over the batch and the regions (``(B, R, N/R)`` blocks, one batched
    similarity matmul, no host sync when the rows are unpadded). Padded rows cut their
    valid tokens, in order, into the ``R`` runs. A ratio budget ``r`` keeps
    ``int(r * N)`` tokens, as the official Qwen2.5-VL script (the LLaVA code takes a count).

    Deviations from the official code:

    * **Overflow.** A region allocated more tokens than it holds keeps them all; the
      official code drops the excess and pads the output with zero vectors up to ``T``
      (as it does when the left-over tokens outnumber the regions, e.g. all scores 0). Here
      every row keeps exactly ``T`` real tokens: the shortfall is filled with the
      highest-``cls_attention`` tokens not yet kept, anywhere in the image
      (``info["topped_up"]``). Without overflow the kept set equals the official one.
    * **Order.** Kept tokens are returned in position order; the official code
      concatenates the regions in order, each region's tokens by descending attention.
    * **Ties** (equal attention in a region, equal region weights) go to the lower
      index; the official ``torch.topk`` leaves their order unspecified.
    * Negative region scores (impossible for a softmax attention) count as 0.
    * On CUDA the region similarities are one product of the tokens divided by their
      norms (``+ 1e-6``) afterwards, in TF32 (:mod:`tokenreduce.precision`), not a product
      of normalised copies: equal up to float32 rounding, which only the allocation's
      floors can notice (a region weight within rounding of a step).

    Qwen2-VL / Qwen2.5-VL have no [CLS] token, so no ``cls_attention``: the adapter
    rejects HoloV when the pipeline is patched. (The official Qwen2.5-VL script scores
    tokens by the mean attention each one receives in the last vision block and sets
    ``R = max(1, int(1024/576 * N / T))``, which is 16 for 576 -> 64; neither signal is
    provided by the adapters.) SigLIP towers (LLaVA-OneVision) are rejected likewise.

    Stages: ``projector`` (published), ``vision_encoder``.

    Paper: Zou et al., "Don't Just Chase “Highlighted Tokens” in MLLMs: Revisiting
    Visual Holistic Context Retention" (HoloV), NeurIPS 2025, arXiv:2510.02912.
    Official code: https://github.com/obananas/HoloV
    """

    name = "holov"
    stages = frozenset({Stage.PROJECTOR, Stage.VISION_ENCODER})
    Params = HoloVParams
    requires = (CLS_ATTENTION,)
    # Only the official Qwen2.5-VL script takes a ratio: keep_num = int(N * prune_rate).
    ratio_rounding = "floor"
    graph_safe = True
    paper = (
        'Zou et al., "Don\'t Just Chase “Highlighted Tokens” in MLLMs: Revisiting Visual Holistic Context '
        'Retention" (HoloV), NeurIPS 2025, arXiv:2510.02912 (github.com/obananas/HoloV)'
    )

    def reduce(self, tokens, counts, valid, context):
        b, n, d = tokens.shape
        att = cls_scores(context.cls_attention, tokens, self.name).masked_fill(~valid, 0)
        if host_reads_free(att) and not bool(torch.isfinite(att).all()):
            # Checked on CPU only (no device sync): NaN would silently decide the allocation.
            raise InvalidInputError(f"{self.name}: context.cls_attention must be finite at the valid tokens")
        pos, ok = region_layout(valid, self.params.regions)
        r_blocks, length = pos.shape[1:]
        flat = pos.view(b, -1).clamp(max=n - 1)
        # index_select on the flattened rows copies whole D-vectors (much faster than a gather
        # with an index expanded over D); cast after selecting, so only the blocks are copied.
        rows = (flat + n * torch.arange(b, device=tokens.device).unsqueeze(1)).view(-1)
        x = tokens.reshape(b * n, d).index_select(0, rows).float().view(b, r_blocks, length, d)
        a = att.gather(1, flat).view(b, r_blocks, length).masked_fill(~ok, 0)

        scores = region_scores(x, a, ok, self.params.alpha)
        sizes = ok.sum(dim=-1)
        alloc = allocate(scores, sizes, counts)
        in_region = ok & (rank_desc(a, ok) < alloc.unsqueeze(-1))

        # Back to token positions (unused block slots write to a spare column n).
        kept = torch.zeros(b, n + 1, dtype=torch.bool, device=tokens.device)
        kept.scatter_(1, pos.view(b, -1), in_region.view(b, -1))
        kept = kept[:, :n]
        # Overflowing regions leave a shortfall: the best remaining tokens by attention fill it.
        short = counts - kept.sum(dim=1)
        spare = valid & ~kept
        topped_up = spare & (rank_desc(att, spare) < short.unsqueeze(1))
        kept = kept | topped_up

        t = context.uniform_count if context.uniform_count is not None else int(counts.max())
        slots = ops.slot_mask(counts, t)
        order = torch.where(kept, torch.arange(n, device=tokens.device), n)
        indices = torch.sort(order, dim=1).values[:, :t].masked_fill(~slots, -1)
        region_of = torch.full((b, n + 1), -1, dtype=torch.long, device=tokens.device)
        region_ids = torch.arange(r_blocks, device=tokens.device).view(1, r_blocks, 1).expand_as(pos)
        region_of.scatter_(1, pos.reshape(b, -1), region_ids.reshape(b, -1))
        info = {
            "region": region_of[:, :n],
            "region_scores": scores,
            "allocation": alloc,
            "topped_up": topped_up,
        }
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info=info)
