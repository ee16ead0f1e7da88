"""``pdrop``: PyramidDrop, drop half of the image tokens at several decoder layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenreduce import AttentionRows, ScoringReducer, Stage
from tokenreduce.context import ReductionContext
from tokenreduce.pipeline import Pipeline, Step

from .fastv import attention_scores

#: The published LLaVA-1.5 schedule: drop at the input of layers 8, 16 and 24, keeping
#: half of the image tokens present each time (576 -> 288 -> 144 -> 72).
PUBLISHED_LAYERS = (8, 16, 24)
PUBLISHED_RATIO = 0.5


class PDrop(ScoringReducer):
    """PyramidDrop: at each stage boundary keep the image tokens the last instruction token attends to most.

    The decoder is split into stages; at the input of each boundary layer (published for
    LLaVA-1.5: layers 8, 16, 24) the image tokens are ranked by the attention of the
    last instruction token (the last token of the prompt, i.e. the last token of the
    sequence at prefill), computed with that boundary layer's own queries and keys
    (its input layer norm, projections and RoPE) and averaged over heads; a fixed
    ratio (published: 0.5) of the image tokens still present is kept, so the image
    part shrinks as a pyramid.

    Each boundary is one ``llm_layer`` step of this reducer with a ratio budget; see
    ``docs/examples/reducers/pdrop.yaml`` or :meth:`schedule`.

    Counts: a ratio budget ``r`` keeps ``floor(r * n)`` of the ``n`` image tokens present
    (``ratio_rounding = "floor"``), as the official code truncates
    (``int(N * ratio)``): 577 -> 288 -> 144 -> 72 and 203 -> 101 -> 50 -> 25 at the
    published 0.5. The official code takes cumulative ratios of the original ``N``
    (``image_token_ratio_list = [0.5, 0.25, 0.125]``, keeping ``int(N * ratio)`` at
    each stage), where each step here sees only its own input. The counts are the same
    whenever ``r`` is ``1/2``, ``1/4``, ... (``floor(floor(N r) r) = floor(N r^2)``
    for ``r = 1/m``), in particular for the published schedule; for other per-step
    ratios (``0.6`` against the official ``[0.6, 0.36, ...]``) a later stage may keep
    one token fewer than ``int(N * 0.36)``, or use an int budget per step. A step keeps
    at least one token, where the official code would keep none when ``N * ratio < 1``.

    The adapter recomputes
    the one attention row per step from q/k (``AttentionRows(query="last",
    layer="current")``), so the model keeps SDPA / FlashAttention rather
    than the eager attention the official code switches to.

    Stages: ``llm_layer`` only.

    Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models
    via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247.
    Official code: https://github.com/Cooperx521/PyramidDrop
    """

    name = "pdrop"
    stages = frozenset({Stage.LLM_LAYER})
    requires = (AttentionRows(query="last", layer="current"),)
    ratio_rounding = "floor"  # official: int(N * ratio)
    graph_safe = True
    paper = (
        'Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual '
        'Redundancy Reduction", CVPR 2025, arXiv:2410.17247 (github.com/Cooperx521/PyramidDrop)'
    )

    def score(self, tokens: torch.Tensor, valid: torch.Tensor, context: ReductionContext) -> torch.Tensor:
        return attention_scores(context.attention, tokens, self.name)

    @classmethod
    def schedule(cls, layers: Sequence[int] = PUBLISHED_LAYERS, ratio: float = PUBLISHED_RATIO) -> Pipeline:
        """The multi-layer pipeline: one ``llm_layer`` step per layer, each keeping ``ratio``."""
        return Pipeline([Step(Stage.LLM_LAYER, cls(ratio, stage=Stage.LLM_LAYER), layer=k) for k in layers])
