"""Context from a ViT vision tower (CLIP, SigLIP): CLS token, CLS attention, patch keys.

Recomputed from the selected layer's own projections, so the tower keeps running under
``sdpa`` / ``flash_attention_2``: only the CLS query row is materialised, never the full
``(N, N)`` attention map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenreduce.errors import ConfigError


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


def vision_context(
    tower: nn.Module, hidden_states: tuple[torch.Tensor, ...], feature_layer: int | list[int], start: int
) -> VisionContext:
    """CLS token, CLS->patch attention (head-averaged) and head-averaged keys of the selected layer.

    Args:
        tower: the vision model (``CLIPVisionModel`` / ``SiglipVisionModel``).
        hidden_states: the tower's hidden states (embeddings first).
        feature_layer: the model's ``vision_feature_layer``.
        start: index of the first feature token (1 when the CLS token is dropped).
    """
    layers = encoder_layers(tower)
    li = selected_layer(feature_layer, len(layers))
    layer = layers[li]
    attn = layer.self_attn
    h_in = hidden_states[li]
    x = layer.layer_norm1(h_in)
    b, n, _ = x.shape
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, H, N, d)
    keys = k.mean(dim=1)[:, start:]
    cls_token = cls_attention = None
    if has_cls(tower):
        q = attn.q_proj(x[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale
        cls_attention = scores.softmax(dim=-1).mean(dim=1)[:, 0, start:].to(x.dtype)
        cls_token = hidden_states[li + 1][:, 0]
    return VisionContext(cls_token, cls_attention, keys)
