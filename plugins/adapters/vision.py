"""Context from a ViT vision tower (CLIP, SigLIP): CLS token, CLS attention, patch keys.

Recomputed from the selected layer's own projections, so the tower keeps running under
``sdpa`` / ``flash_attention_2``: only the CLS query row is materialised, never the full
``(N, N)`` attention map. A reducer that also scores by a shallower layer's [CLS] attention
(VScan's local scan) declares that layer as the class attribute ``shallow_cls_layer``; the
row is then recomputed the same way and handed over as ``context.extra[SHALLOW_CLS_KEY]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tokenreduce.errors import ConfigError
from tokenreduce.pipeline import Step

from .units import ContextSource

#: ``context.extra`` key of the ``(B, N)`` head-averaged [CLS] attention of the encoder layer
#: a step's reducer names in ``shallow_cls_layer``.
SHALLOW_CLS_KEY = "shallow_cls_attention"


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP / SigLIP vision model."""
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        mod = tower
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ConfigError(f"cannot find the encoder layers of vision tower {type(tower).__name__}")


def has_cls(tower: nn.Module) -> bool:
    """CLIP-style towers prepend a [CLS] embedding; SigLIP does not."""
    emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    return emb is not None and hasattr(emb, "class_embedding")


def selected_layer(feature_layer: int | list[int], num_layers: int) -> int:
    """Index of the encoder block whose output is ``hidden_states[feature_layer]`` (the last one if a list)."""
    idx = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    hs = idx % (num_layers + 1)  # hidden_states has num_layers + 1 entries (embeddings first)
    if hs == 0:
        raise ConfigError("vision_feature_layer selects the patch embeddings; no attention layer to read context from")
    return hs - 1


@dataclass
class VisionContext:
    """Per image (rows of the tower batch), aligned with the selected feature tokens."""

    cls_token: torch.Tensor | None  # (B, D_v)
    cls_attention: torch.Tensor | None  # (B, N)
    keys: torch.Tensor  # (B, N, head_dim), head-averaged
    shallow_cls_attention: torch.Tensor | None = None  # (B, N), as cls_attention at layer shallow_cls_layer

    def source(self, per_item: dict[str, torch.Tensor | None] | None = None) -> ContextSource:
        """These rows as the engine's context source: one unit per row, tokens flat (plus ``per_item`` fields)."""
        per_token = {"cls_attention": self.cls_attention, "keys": self.keys, f"extra.{SHALLOW_CLS_KEY}": self.shallow_cls_attention}
        items = {"cls_token": self.cls_token, **(per_item or {})}
        return ContextSource(
            per_token={k: v.flatten(0, 1) for k, v in per_token.items() if v is not None},
            per_item={k: v for k, v in items.items() if v is not None},
        )


def shallow_cls_layer(steps: Iterable[Step | None], num_layers: int) -> int | None:
    """The encoder layer whose [CLS] attention a step's reducer asks for (``shallow_cls_layer``).

    None when no step asks, or the tower has no such layer (the reducer then falls back on
    ``cls_attention``, as it documents). Steps asking for different layers are refused.
    """
    asked = {getattr(s.reducer, "shallow_cls_layer", None) for s in steps if s is not None} - {None}
    if len(asked) > 1:
        raise ConfigError(f"encoder-side steps ask for the [CLS] attention of different layers {sorted(asked)}; "
                          "one vision tower pass provides one shallow layer")
    layer = next(iter(asked), None)
    return layer if layer is not None and 0 <= layer < num_layers else None


def _layer_keys(layer: nn.Module, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed input (B, N+1, D), keys (B, H, N+1, d))`` of an encoder layer given its input."""
    attn = layer.self_attn
    x = layer.layer_norm1(h_in)
    b, n, _ = x.shape
    return x, attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)


def _cls_row(layer: nn.Module, x: torch.Tensor, k: torch.Tensor, start: int) -> torch.Tensor:
    """``(B, N)`` head-averaged attention of the [CLS] query (position 0) to the tokens from ``start``."""
    attn = layer.self_attn
    q = attn.q_proj(x[:, :1]).view(x.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale
    return scores.softmax(dim=-1).mean(dim=1)[:, 0, start:].to(x.dtype)


def vision_context(
    tower: nn.Module,
    hidden_states: tuple[torch.Tensor, ...],
    feature_layer: int | list[int],
    start: int,
    steps: Iterable[Step | None] = (),
) -> VisionContext:
    """CLS token, CLS->patch attention (head-averaged) and head-averaged keys of the selected layer.

    Args:
        tower: the vision model (``CLIPVisionModel`` / ``SiglipVisionModel``).
        hidden_states: the tower's hidden states (embeddings first).
        feature_layer: the model's ``vision_feature_layer``.
        start: index of the first feature token (1 when the CLS token is dropped).
        steps: the encoder-side steps; if one's reducer declares ``shallow_cls_layer``, that
            layer's [CLS] attention row is recomputed too (:func:`shallow_cls_layer`).
    """
    layers = encoder_layers(tower)
    li = selected_layer(feature_layer, len(layers))
    x, k = _layer_keys(layers[li], hidden_states[li])
    keys = k.mean(dim=1)[:, start:]
    cls_token = cls_attention = shallow = None
    if has_cls(tower):
        cls_attention = _cls_row(layers[li], x, k, start)
        cls_token = hidden_states[li + 1][:, 0]
        si = shallow_cls_layer(steps, len(layers))
        if si is not None:
            shallow = _cls_row(layers[si], *_layer_keys(layers[si], hidden_states[si]), start)
    return VisionContext(cls_token, cls_attention, keys, shallow)
