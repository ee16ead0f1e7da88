"""``cls_attn``: FasterVLM, keep the patches the vision [CLS] token attends to most."""

from __future__ import annotations

import torch

from tokenreduce import CLS_ATTENTION, ScoringReducer, Stage
from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError


def cls_scores(cls_attention: torch.Tensor, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """``context.cls_attention (B, N)`` checked against the tokens, as float32 on their device."""
    b, n, _ = tokens.shape
    if tuple(cls_attention.shape) != (b, n):
        raise InvalidInputError(
            f"{name}: context.cls_attention must have shape (B, N)=({b}, {n}), got {tuple(cls_attention.shape)}"
        )
    return cls_attention.float().to(tokens.device)


class ClsAttention(ScoringReducer):
    """FasterVLM: keep the T patch tokens with the highest [CLS] attention in the vision encoder.

    Scores are the attention of the vision tower's [CLS] query to each patch in the
    layer whose features the VLM uses (``select_layer``, -2 for LLaVA), averaged over
    heads (``context.cls_attention``). Selection is encoder-side, so the LLM never sees
    the dropped tokens; at the ``projector`` stage the same indices are applied to the
    projected features (LLaVA's projector is per-token, so both stages keep the same
    tokens; the official code prunes after the projector).

    Models without a [CLS] token (Qwen2-VL / Qwen2.5-VL) have no ``cls_attention``: the
    adapter rejects the pipeline when it is patched, naming the missing context.

    Stages: ``vision_encoder``, ``projector``.

    Paper: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token
    Pruning: Make VLM Inference Faster", arXiv:2412.01818 (2024; extended as VisPruner,
    ICCV 2025). Official code: https://github.com/Theia-4869/FasterVLM
    """

    name = "cls_attn"
    stages = frozenset({Stage.VISION_ENCODER, Stage.PROJECTOR})
    requires = (CLS_ATTENTION,)
    graph_safe = True
    paper = (
        'Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM '
        'Inference Faster" (FasterVLM), arXiv:2412.01818 (github.com/Theia-4869/FasterVLM)'
    )

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        return cls_scores(context.cls_attention, tokens, self.name)
