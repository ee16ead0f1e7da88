"""``dart``: pivot tokens, then the tokens least similar to each pivot (duplication-aware)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tokenreduce import KEYS, TEXT, TEXT_KEYS, Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale

from .ranking import stable_order


class DARTParams(ReducerParams):
    pivot_image_tokens: int = Field(default=4, ge=1, description="Image pivots (kept; published 4).")
    pivot_text_tokens: int = Field(
        default=4, ge=0, description="Text pivots (not kept; published 4 in the decoder). Needs context.text_embeds."
    )
    pivot_by: Literal["key_norm", "token_norm"] = Field(
        default="key_norm",
        description="Pivot criterion: largest L1 norm of the keys (published; needs context.keys, and "
        "context.text_keys for text pivots) or of the features themselves.",
    )


def _l1_norms(v: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` float32 L1 norms over the last dim. CUDA: one reduction reading ``v`` in its
    own dtype (CPU: ``v.float().abs().sum()``, the official op, which writes two copies)."""
    if ops.cuda_formulas(v):
        return torch.linalg.vector_norm(v, ord=1, dim=-1, dtype=torch.float32)
    return v.float().abs().sum(dim=-1)


def _check(name: str, value: torch.Tensor, b: int, n: int | None, what: str) -> None:
    if value.dim() != 3 or value.shape[0] != b or (n is not None and value.shape[1] != n):
        shape = f"({b}, {n if n is not None else 'L'}, D)"
        raise InvalidInputError(f"dart: context.{name} must have shape {shape} ({what}), got {tuple(value.shape)}")


class DART(Reducer):
    """DART: keep a few pivot tokens and the tokens least duplicated by (least similar to) them.

    1. Pivots: the ``pivot_image_tokens`` image tokens and ``pivot_text_tokens`` text
       tokens with the largest L1 norm of their keys (``pivot_by="key_norm"``,
       published; ``"token_norm"`` ranks by the features' L1 norm instead, one of the
       alternatives the paper reports as comparable).
    2. For each pivot in sequence order (image pivots, then text pivots), the
       not-yet-kept image tokens with the lowest cosine similarity to the pivot are
       kept; each pivot gets an equal share of the ``T - pivot_image_tokens``
       remaining budget (the first ``(T - P_img) % P`` pivots one more). Image
       pivots are kept; text pivots only guide the choice.

    Pivot order: pivots are visited in position order. The official code iterates a
    Python ``set`` of the pivots' sequence positions (``for item in list(tmp_set)``), in
    an order set by hashing (for ints, the position modulo the table size, probing on
    collisions), not by position. As each pivot takes the tokens least similar to it
    among those not yet kept, the order can change which tokens are kept when two
    pivots compete for the same token. The faithfulness fixture uses inputs whose set
    order is ascending.

    Budget mapping: the official code keeps the image pivots *plus*
    ``max_num_trunction // P`` tokens per pivot (132 for "128" with 4+4 pivots); here
    exactly ``T`` are kept, pivots included. If ``T < pivot_image_tokens`` only the
    top-``T`` pivots are kept.

    Context. ``llm_layer`` (published: ``K=2``, LLaVA-1.5, 128 kept): ``keys`` are the
    image tokens' keys of layer ``K-1`` (post-RoPE, heads concatenated; ``KEYS`` reads
    layer ``"previous"`` by default), ``text_embeds``/``text_mask`` the hidden states
    of the text tokens after the image and ``text_keys`` their keys. The official
    code computes similarities on the final-norm of layer ``K-1``'s output; here they
    use the tokens as given (the hidden states entering layer ``K``). ``projector``:
    ``keys`` are the selected vision layer's keys; with no text there, set
    ``pivot_text_tokens: 0`` (or pass text embeddings of the LLM width).

    ``requires`` follows the parameters: ``KEYS`` for key-norm pivots, ``TEXT`` (and
    ``TEXT_KEYS`` for key norms) when ``pivot_text_tokens > 0``.

    On CUDA all pivots' cosine similarities come from one product divided by the norms
    (:func:`tokenreduce.ops.cosine_similarity`, TF32 as :mod:`tokenreduce.precision` sets)
    and L1 norms from one reduction: equal up to float32 rounding, so near-equal
    similarities or norms can order differently. With Triton each pivot's stable sort is one
    counting kernel (:mod:`tokenreduce_plugins.ranking`): the same order, except that
    similarities ``-0.0`` and ``+0.0`` tie as on CPU (CUDA's radix sort orders them).

    Stages: ``projector``, ``llm_layer``.

    Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language
    Models: Duplication Matters More", EMNLP 2025, arXiv:2502.11494.
    Official code: https://github.com/ZichenWen1/DART
    """

    name = "dart"
    stages = frozenset({Stage.PROJECTOR, Stage.LLM_LAYER})
    Params = DARTParams
    # The default parameters' needs; each instance narrows this to its own parameters.
    requires = (KEYS, TEXT, TEXT_KEYS)  # read at llm_layer from layer K-1, the default
    # Without a mask every loop bound is host-known (below): no device read.
    graph_safe = True
    paper = (
        'Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More", '
        "EMNLP 2025, arXiv:2502.11494 (github.com/ZichenWen1/DART)"
    )

    def __init__(self, budget=None, *, stage=None, **params: Any):
        super().__init__(budget, stage=stage, **params)
        p = self.params
        need = []
        if p.pivot_by == "key_norm":
            need.append(KEYS)
        if p.pivot_text_tokens > 0:
            need.append(TEXT)
            if p.pivot_by == "key_norm":
                need.append(TEXT_KEYS)
        self.requires = tuple(need)  # type: ignore[misc]  # per-instance, shadows the class default

    def _pivots(self, x, tokens, counts, valid, context, t_img):
        """Pivot features ``(B, P, D)`` in sequence order, their mask, and the kept image pivots.

        ``x`` are the tokens in float32, rows of extreme magnitude divided by a power of
        two (which changes neither norm rankings within a row nor cosine similarities).
        ``t_img`` is the largest image pivot count (host-known); the text pivots get
        ``min(L, pivot_text_tokens)`` slots, real or not (their mask says)."""
        b, n, d = tokens.shape
        p = self.params
        if p.pivot_by == "key_norm":
            _check("keys", context.keys, b, n, "keys of the image tokens")
            img_norm = _l1_norms(context.keys)
        else:
            img_norm = _l1_norms(x)
        n_img = counts.clamp(max=p.pivot_image_tokens)
        order, img_slots = ops.topk_per_row(img_norm.to(tokens.device), n_img, valid, t_img)
        img_idx = ops.ascending(order, img_slots)
        feats, ok = [ops.gather_rows(x, img_idx)], [img_slots]
        if p.pivot_text_tokens > 0:
            text = context.text_embeds
            _check("text_embeds", text, b, None, "hidden states of the text tokens")
            if text.shape[2] != d:
                raise InvalidInputError(
                    f"dart: context.text_embeds width {text.shape[2]} differs from the tokens' width {d}; "
                    "text pivots need features in the same space (or set pivot_text_tokens=0)"
                )
            text = text.to(tokens.device).float()
            text_ok = (
                torch.ones(text.shape[:2], dtype=torch.bool, device=tokens.device)
                if context.text_mask is None
                else context.text_mask.to(tokens.device).bool()
            )
            if p.pivot_by == "key_norm":
                _check("text_keys", context.text_keys, b, text.shape[1], "keys of the text tokens")
                text_norm = _l1_norms(context.text_keys).to(tokens.device)
            else:
                text_norm = _l1_norms(text)
            n_txt = text_ok.sum(dim=1).clamp(max=p.pivot_text_tokens)
            # Slots for every possible text pivot: the count per row depends on text_mask (a
            # device value); unused slots are masked, and a pivot slot past n_piv gets no quota.
            order, txt_slots = ops.topk_per_row(text_norm, n_txt, text_ok, min(text.shape[1], p.pivot_text_tokens))
            txt_idx = ops.ascending(order, txt_slots)
            feats.append(ops.gather_rows(text, txt_idx))
            ok.append(txt_slots)
        feats, ok = torch.cat(feats, dim=1), torch.cat(ok, dim=1)
        # Real pivots first, in sequence order (image pivots precede the text after the image).
        first = torch.sort((~ok).long(), dim=1, stable=True).indices
        return ops.gather_rows(feats, first), ok.gather(1, first), img_idx, img_slots

    def reduce(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        p = self.params
        # Host-known bounds: without a mask the uniform count; with one, the largest count
        # (one device read, as the masked path may).
        t = context.uniform_count if context.uniform_count is not None else int(counts.max())
        t_img = min(t, p.pivot_image_tokens)
        # Float32 tokens, rows of extreme magnitude divided by a power of two (exact), so
        # L1 norms and cosine similarities cannot overflow float32 (bfloat16 near 1e38).
        # Without padding (uniform_count set) there is nothing to mask.
        x, _ = safe_scale(tokens, None if context.uniform_count is not None else valid)
        pivots, pivot_ok, img_idx, img_slots = self._pivots(x, tokens, counts, valid, context, t_img)
        n_piv = pivot_ok.sum(dim=1)
        rest = counts - img_slots.sum(dim=1)  # budget left after the kept image pivots
        base, extra = rest // n_piv.clamp(min=1), rest % n_piv.clamp(min=1)
        # A pivot's quota is at most the budget left after the image pivots, t - t_img.
        quota_max = max(0, t - t_img)

        kept = ops.keep_mask_from(img_idx, img_slots, n)
        n_pivots = pivots.shape[1] if quota_max > 0 else 0
        if n_pivots:
            if ops.cuda_formulas(x):
                # Every pivot's similarities from one product (B, P, N), reading the tokens
                # once, with no normalised copy (ops.cosine_similarity's CUDA formulation).
                sims, x_unit = ops.cosine_similarity(pivots, x), None
            else:
                # The tokens normalised once, not once per pivot (the same tensor each time).
                sims, x_unit = None, ops.normalize(x)
            # A handful of pivots, each step batched and never reading the device: a pivot
            # slot with no quota in any row (padding, or a text pivot a row lacks) keeps
            # nothing. The quotas and their slot masks of every pivot are made at once, and a
            # step marks its picks in ``free`` (the tokens still to pick from, plus a spare
            # column for padded slots) directly: ops.topk_per_row + keep_mask_from, inlined,
            # in seven kernels a pivot instead of about twenty.
            j = torch.arange(n_pivots, device=tokens.device)
            quota = torch.where(j < n_piv[:, None], base[:, None] + (j < extra[:, None]).long(), 0)  # (B, P)
            slots_all = torch.arange(quota_max, device=tokens.device) < quota.unsqueeze(-1)  # (B, P, quota_max)
            free = torch.cat([valid & ~kept, valid.new_zeros(b, 1)], dim=1)
            lowest = torch.full((), torch.finfo(torch.float32).min, device=tokens.device)
            spare = torch.full((), n, device=tokens.device)
            for j in range(n_pivots):
                if sims is not None:
                    sim = sims[:, j]
                else:
                    sim = (ops.normalize(pivots[:, j : j + 1]) @ x_unit.transpose(1, 2))[:, 0]  # (B, N) cosine
                # Most dissimilar first; ties to the lower index (a stable sort, as topk_per_row).
                masked = torch.where(free[:, :n], -sim, lowest)
                order = stable_order(masked, descending=True)[:, :quota_max]
                free.scatter_(1, torch.where(slots_all[:, j], order, spare), False)
            kept = valid & ~free[:, :n]

        slots = ops.slot_mask(counts, t)
        positions = torch.where(kept, torch.arange(n, device=tokens.device), n)
        indices = torch.sort(positions, dim=1).values[:, :t].masked_fill(~slots, -1)
        info = {"pivots": img_idx}
        return make_reduction(tokens, indices, slots, sizes=slots.float(), info=info)
