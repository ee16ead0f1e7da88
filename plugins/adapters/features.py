"""Vision features of LLaVA-style checkpoints for ``tokenreduce show --model`` (hook ``tokenreduce_vision_features``).

LLaVA-style: the model (or its inner ``model``) has a ``vision_tower`` and a
``multi_modal_projector``, and its config a single int ``vision_feature_layer``. The tokens
are that layer's output without [CLS] (what the projector receives); [CLS] attention is
head-averaged from the same layer, and the keys are that layer's, heads concatenated.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenreduce.errors import InvalidInputError
from tokenreduce.visualize import Features, image_processor


def llava_features(image: Any, model: Any, model_id: str, device: str) -> Features | None:
    """The patch tokens of ``image`` from a LLaVA-style ``model``; ``None`` for any other model."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        return None  # not LLaVA-style: another plugin may know the model
    if not hasattr(getattr(tower, "vision_model", tower).encoder, "layers"):
        return None  # not a CLIP/SigLIP tower (e.g. InternViT): another plugin may know it
    model.to(device)
    tower.set_attn_implementation("eager")  # attention weights are needed for [CLS] attention
    processor = image_processor(model_id)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].to(device)
    layer = getattr(model.config, "vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise InvalidInputError(
            f"model={model_id!r}: vision_feature_layer={layer!r}; only a single int layer is supported"
        )
    # transformers 5 keeps the encoder on the tower itself; older layouts nest it in vision_model.
    layers = getattr(tower, "vision_model", tower).encoder.layers
    # hidden_states[0] is the embedding output: hidden_states[i] comes out of layer i - 1.
    at = layer if layer < 0 else layer - 1
    if at == -1 - len(layers) or layer == 0:
        raise InvalidInputError(
            f"model={model_id!r}: vision_feature_layer={layer} is the embedding output; it has no attention"
        )
    keys: dict[str, torch.Tensor] = {}
    target = layers[at]
    handle = target.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: keys.__setitem__("k", out))
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    # hidden_states[0] is the embedding output, so layer L's output is hidden_states[L + 1].
    hidden = out.hidden_states[layer]  # indexed as the model does
    attn = out.attentions[at]  # (1, heads, 1+N, 1+N) of the layer that produced ``hidden``
    n = hidden.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise InvalidInputError(f"model={model_id!r}: {n} patch tokens do not form a square grid")
    pixels = pixel_values[0].float().cpu()
    shown = ((pixels - pixels.amin()) / (pixels.amax() - pixels.amin()).clamp_min(1e-6) * 255).permute(1, 2, 0)

    def project(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return projector(tokens.to(device)).float()

    return Features(
        image=shown.to(torch.uint8).numpy(),
        grid=(side, side),
        tokens=hidden[:, 1:].float(),
        cls_token=hidden[:, 0].float(),
        cls_attention=attn[:, :, 0, 1:].mean(dim=1).float(),
        keys=keys["k"][:, 1:].float(),
        project=project,
        source=f"{model_id} vision tower",
    )
