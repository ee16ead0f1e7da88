"""``fastv``: keep the image tokens the last token attends to most, inside the decoder."""

from __future__ import annotations

import torch

from tokenreduce import AttentionRows, ScoringReducer, Stage
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError


def attention_scores(attention: torch.Tensor, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, N)`` mean over the query rows of ``context.attention (B, Q, N)``, checked against the tokens.

    Shared by the decoder-attention reducers (FastV, PyramidDrop). Attention is already
    averaged over heads by the adapter; with ``AttentionRows(query="last")`` there is one row.
    """
    b, n, _ = tokens.shape
    if attention.dim() != 3 or attention.shape[0] != b or attention.shape[2] != n or attention.shape[1] < 1:
        raise InvalidInputError(
            f"{name}: context.attention must have shape (B, Q, N)=({b}, Q>=1, {n}), got {tuple(attention.shape)}"
        )
    return attention.float().mean(dim=1).to(tokens.device)


class FastV(ScoringReducer):
    """FastV: keep the image tokens that receive the most attention from the last token.

    At decoder layer ``K`` (published: ``K=2``, drop ``R=50%``), image tokens are ranked
    by the attention the last token of the sequence paid them in layer ``K-1``,
    averaged over heads; the top ``T`` are kept and the rest dropped for all later
    layers (prefill only; decoding reuses the shortened KV cache).

    The attention row is not read from an eager attention map: the adapter recomputes
    it from layer ``K-1``'s queries and keys for the last row only
    (``requires = (AttentionRows("last", "previous"),)``), so the model keeps
    SDPA / FlashAttention. ``score`` is that row (the mean over rows if an adapter
    passes several).

    Stages: ``llm_layer`` only (the signal exists only inside the decoder).

    Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
    Inference Acceleration for Large Vision-Language Models", ECCV 2024,
    arXiv:2403.06764. Official code: https://github.com/pkunlp-icler/FastV
    """

    name = "fastv"
    stages = frozenset({Stage.LLM_LAYER})
    requires = (AttentionRows(query="last", layer="previous"),)
    graph_safe = True
    paper = (
        'Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764 '
        "(github.com/pkunlp-icler/FastV)"
    )

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        return attention_scores(context.attention, tokens, self.name)
