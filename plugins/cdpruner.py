"""``cdpruner``: conditional DPP, the most diverse tokens under a kernel weighted by instruction relevance."""

from __future__ import annotations

import torch
from pydantic import Field

from tokenreduce import TEXT, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale

from . import kernels

#: The official min-max normalisation's offset: the least relevant token keeps a tiny weight.
_RELEVANCE_OFFSET = 1e-6


class CDPrunerParams(ReducerParams):
    theta: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Relevance weight (the official code's commented-out option): the normalised relevance r "
        "becomes exp(alpha * r), alpha = theta / (2 * (1 - theta)); 0 ignores relevance (a similarity-only DPP). "
        "None (official default) uses r itself.",
    )
    negate_relevance: bool = Field(
        default=True,
        description="Relevance is the mean *negative* cosine similarity to the instruction, as in the official "
        "code (CLIP's patch embeddings are anti-aligned with the text embedding); False uses the plain similarity.",
    )


def unit_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Float32 unit vectors of ``x (B, N, D)`` (zero at invalid rows), for any finite magnitude.

    Rows of extreme magnitude are first divided by a power of two (exact; cosines are
    unchanged), so squared norms cannot overflow float32.
    """
    return ops.normalize(safe_scale(x, valid)[0])


def instruction_relevance(
    img: torch.Tensor,
    txt: torch.Tensor,
    text_mask: torch.Tensor,
    valid: torch.Tensor,
    *,
    negate: bool = True,
    theta: float | None = None,
) -> torch.Tensor:
    """``(B, N)`` relevance of each token to the instruction, min-max normalised per row (0 at padding).

    ``img (B, N, D)`` and ``txt (B, L, D)`` are unit vectors (:func:`unit_rows`).
    ``r_i = mean_l -cos(x_i, t_l)`` over the valid text rows, then
    ``(r - min + 1e-6) / (max - min)`` over the row's valid tokens (the official formula);
    a row whose relevance is constant (or that has no text) gets 1 everywhere. With
    ``theta`` the result becomes ``exp(alpha * r)``, ``alpha = theta / (2 (1 - theta))``.
    """
    sim = img @ txt.transpose(1, 2)  # (B, N, L)
    if negate:
        sim = -sim
    m = text_mask.float()
    rel = (sim * m.unsqueeze(1)).sum(dim=-1) / m.sum(dim=-1).clamp_min(1).unsqueeze(1)
    lo = rel.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
    hi = rel.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # constant relevance (or no text): every token equally relevant
    rel = torch.where(flat, torch.ones_like(rel), (rel - lo + _RELEVANCE_OFFSET) / torch.where(flat, 1.0, span))
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        rel = torch.exp(alpha * rel)
    return rel.masked_fill(~valid, 0.0)


def conditional_kernel(img: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` DPP kernel ``L_ij = r_i * cos(x_i, x_j) * r_j`` of unit vectors ``img``, in float32."""
    similarity = img @ img.transpose(1, 2)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def greedy_map(
    kernel: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast greedy MAP inference of a DPP (Chen et al., NeurIPS 2018), batched.

    Each step picks the token with the largest conditional variance ``d_j^2`` given the
    tokens already picked, then updates the incremental Cholesky rows ``c`` and every
    ``d^2`` (the official loop, vectorised over rows). Returns ``(picks (B, t), slots
    (B, t))``: indices in selection order (``-1`` past a row's count) and the slot mask.

    On CUDA (Triton importable, ``TOKENREDUCE_NO_TRITON`` unset) the whole loop runs as one
    fused kernel (:func:`tokenreduce_plugins.kernels.greedy.greedy_map_fused`); elsewhere
    as the torch loop below.
    """
    if kernels.fused_wanted(kernel):
        fused = kernels.greedy_module().greedy_map_fused(kernel, counts, valid, t)  # type: ignore[union-attr]
        if fused is not None:  # None: a case the kernel does not take (the loop below does)
            return fused
    b, n, _ = kernel.shape
    cis = kernel.new_zeros(b, t, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    slots = ops.slot_mask(counts, t)
    available = valid.clone()
    floor = -torch.finfo(kernel.dtype).max  # below any finite d^2, above the -inf of taken tokens
    picks = []
    # Made once: a Python scalar in where() becomes a device tensor (a fill kernel) per step.
    neg_inf, zero = kernel.new_full((), float("-inf")), kernel.new_zeros(())
    # A fixed, host-known number of steps whose every operation stays on the device (no
    # sync), so the loop can be captured in a CUDA graph; about 14 kernels a step. A row
    # past its count keeps stepping on its own data; its extra picks are masked at the end.
    # Picks are indices, never differentiated: without autograd, each step's row of c is
    # written in place by its where() (no copy).
    with torch.no_grad():
        for i in range(t):
            # Taken and padded tokens are excluded explicitly (the official code marks taken ones
            # -inf); non-finite d^2 of a degenerate kernel never wins over a finite one.
            score = torch.where(available, di2s.nan_to_num(nan=floor, neginf=floor), neg_inf)
            j = score.argmax(dim=1, keepdim=True)  # (B, 1), first index on ties
            d2 = di2s.gather(1, j)
            ok = d2 > 0  # the official code takes sqrt(d^2) unguarded (NaN once the kernel is exhausted)
            num = kernel.gather(1, j.unsqueeze(2).expand(b, 1, n)).squeeze(1)  # L[j, :]
            if i > 0:
                done = cis[:, :i]  # (B, i, N): the Cholesky rows of the i picks so far
                # sum_t c_t[j] * c_t (the official einsum); a product and a sum, as a (1 x i) @ (i x N)
                # batched matmul takes a slow path on CPU. (At i = 0 the sum is empty: L[j, :] - 0.)
                num = num - (done.gather(2, j.unsqueeze(1).expand(b, i, 1)) * done).sum(dim=1)
            # Where d^2 <= 0 the quotient (inf or NaN) is discarded by the where: no guarded square root.
            eis = torch.where(ok, num / torch.sqrt(d2), zero, out=cis[:, i])
            di2s = di2s - torch.square(eis)
            available.scatter_(1, j, False)
            picks.append(j)
    return torch.cat(picks, dim=1).masked_fill(~slots, -1), slots


def _check_text(context: ReductionContext, b: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    text = context.text_embeds
    if text.dim() != 3 or text.shape[0] != b or text.shape[2] != d:
        raise InvalidInputError(
            f"cdpruner: context.text_embeds must have shape (B, L, D)=({b}, L, {d}) (the instruction's "
            f"embeddings in the tokens' width), got {tuple(text.shape)}"
        )
    if context.text_mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device)
    else:
        mask = context.text_mask
        if tuple(mask.shape) != tuple(text.shape[:2]):
            raise InvalidInputError(
                f"cdpruner: context.text_mask must have shape (B, L)={tuple(text.shape[:2])}, got {tuple(mask.shape)}"
            )
        mask = mask.to(device).bool()
    return text.to(device), mask


class CDPruner(Reducer):
    """CDPruner: keep the most diverse tokens under a DPP kernel conditioned on the instruction.

    1. Relevance: ``r_i`` = the mean over the instruction's embeddings ``t_l`` of
       ``-cos(x_i, t_l)``, min-max normalised over the row's tokens,
       ``(r - min + 1e-6) / (max - min)`` (so the least relevant token weighs ~1e-6 and
       is in effect never kept).
    2. Conditional kernel: ``L_ij = r_i * cos(x_i, x_j) * r_j`` (similarity of the
       projected tokens, weighted by relevance). ``theta`` optionally reweights relevance
       as ``exp(alpha * r)``, ``alpha = theta / (2 (1 - theta))``, the official code's
       commented-out option (off by default, as there).
    3. Selection: fast greedy MAP inference of the DPP (Chen et al., NeurIPS 2018):
       ``T`` steps, each picking the token with the largest conditional variance given
       those already picked (the first: the largest ``r_i^2``). ``T`` device-only steps,
       vectorised over the batch, ``O(N^2)`` memory per row.

    Kept tokens are returned in position order with unchanged features;
    ``info["selection_order"]`` lists the picks in order and ``info["relevance"]`` the
    normalised relevance.

    Published setting: LLaVA-1.5-7B, pruning after the projector (``projector``) to 64,
    128 or 192 tokens (``budget: 64`` etc.; the official ``visual_token_num``).

    Deviations from the official code (github.com/Theia-4869/CDPruner,
    ``llava/model/llava_arch.py``, ``encode_images``):

    * Relevance signal. The official relevance compares CLIP image embeddings of the
      patches (the selected layer's features through CLIP's ``post_layernorm`` and
      ``visual_projection``) with the CLIP text tower's embedding of the question (one
      per 77-token segment). A VLM carries neither CLIP's text tower nor its visual
      projection, so here relevance compares the projected tokens themselves with
      ``context.text_embeds``, the LLM input embeddings of the instruction's tokens
      (LLaVA family: the text after the last image; Qwen-VL: the sequence's text
      tokens), averaged over the valid tokens (``text_mask``). The similarity term is
      the official one (cosine of the projector outputs). Given the same vectors for
      both, the selection equals the official code's (the faithfulness fixture). The
      negation is the official one, tuned to CLIP; ``negate_relevance: false`` flips it.
    * Normalisation per row: the official min and max run over every image of the call
      (one for LLaVA-1.5; a LLaVA-NeXT image's crops together); here over each row's
      valid tokens, so rows stay independent. A row with constant relevance (or no
      instruction tokens) gets relevance 1 everywhere, where the official code divides
      by zero.
    * Degenerate kernels (more picks than the kernel's rank, duplicate or zero tokens):
      the official code takes the square root of a non-positive conditional variance
      (NaN, then undefined picks); here such a step adds nothing to the Cholesky rows and
      the next pick is the unpicked token with the largest remaining variance (lowest
      index on ties). Picked and padded tokens are excluded explicitly.
    * Fused loop on CUDA: with Triton installed (and ``TOKENREDUCE_NO_TRITON`` unset) the
      greedy loop runs as one fused Triton kernel, one program per row. Its float32 sums
      over the earlier picks are ordered differently from the torch loop's (used on CPU),
      so a near-tie between two tokens' conditional variances can resolve differently;
      that is its only difference from the torch loop.
    * Precision: float32 throughout (the official code normalises the float16 projector
      output in float16, then casts); rows of extreme magnitude are first divided by a
      power of two, which leaves every cosine unchanged.
    * Budget: the official count is absolute (``visual_token_num``, per image; per crop
      on LLaVA-NeXT). A ratio budget rounds half up (the library default); the
      LLaVA-NeXT adapter splits an image's budget between base and crops.

    Stages: ``projector`` only: the official similarity is on projector outputs, and the
    instruction's embeddings (LLM width) compare with tokens of that width.

    Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
    Diversity for Token Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967.
    Official code: https://github.com/Theia-4869/CDPruner
    """

    name = "cdpruner"
    stages = frozenset({Stage.PROJECTOR})
    Params = CDPrunerParams
    requires = (TEXT,)
    graph_safe = True
    paper = (
        'Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in '
        'MLLMs", NeurIPS 2025, arXiv:2506.10967 (github.com/Theia-4869/CDPruner)'
    )

    def reduce(self, tokens, counts, valid, context):
        b, n, d = tokens.shape
        text, text_mask = _check_text(context, b, d, tokens.device)
        p = self.params
        img = unit_rows(tokens, valid)
        relevance = instruction_relevance(
            img, unit_rows(text, text_mask), text_mask, valid, negate=p.negate_relevance, theta=p.theta
        )
        kernel = conditional_kernel(img, relevance)
        t = context.uniform_count if context.uniform_count is not None else int(counts.max())
        picks, slots = greedy_map(kernel, counts, valid, t)
        indices = ops.ascending(picks, slots)
        info = {"selection_order": picks, "relevance": relevance}
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info=info)
