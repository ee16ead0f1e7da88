"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP tower, MLP projector, Llama)."""

from __future__ import annotations

import torch

from tokenreduce.errors import InvalidInputError

from .engine import Family
from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ENCODER_STAGES
from .units import Units, keep_mask
from .vision import vision_context


def select_features(hidden_states, feature_layer, start: int) -> torch.Tensor:
    """The model's image features: ``hidden_states[feature_layer]`` (concatenated if a list), from ``start``."""
    if isinstance(feature_layer, int):
        feats = hidden_states[feature_layer]
    else:
        feats = torch.cat([hidden_states[i] for i in feature_layer], dim=-1)
    return feats[:, start:]


class LlavaAdapter(LlavaFamilyAdapter):
    """LLaVA-1.5: each image is one row of ``h x w`` patch tokens (CLS dropped by the
    ``default`` strategy); ``vision_encoder`` steps reduce them in the vision width before
    the projector, ``projector`` steps in the LLM width after it. Context: the selected
    vision layer's CLS token, CLS attention row and head-averaged keys (recomputed from
    that layer's q/k for the CLS row only), the patch grid while it is intact, and the
    instruction's embeddings.
    """

    family = Family("llava", ("LlavaForConditionalGeneration",), fast_prefill=True)

    def patch_grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def llm_grid(self):
        return self.patch_grid()

    def encode(self, kw: dict) -> dict[str, Encoded]:
        inner = self.inner
        if kw.get("image_sizes") is not None:
            raise InvalidInputError("image_sizes (pixtral-style vision towers) is not supported by the llava adapter")
        layer, _, start = self.feature_selection(kw)
        out = inner.vision_tower(kw["pixel_values"], output_hidden_states=True, return_dict=True)
        tokens = select_features(out.hidden_states, layer, start)
        n, total = tokens.shape[:2]
        h, w = self.patch_grid()
        grid = (h, w) if h * w == total else None
        vctx = None
        if self.needs("cls_token", "cls_attention", "keys"):
            vctx = vision_context(inner.vision_tower, out.hidden_states, layer, start, map(self.step, ENCODER_STAGES))
        text, text_mask = self.text_context("image", [total] * n)

        def project(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            # Unreduced: the stock projector on the stock tensor, so identity is bit for bit.
            return inner.multi_modal_projector(x if reduced else tokens).flatten(0, -2)

        flat, units, original = self.reduce_units(
            tokens.flatten(0, 1), Units.rows(n, total, grid, tokens.device), self.unit_context(vctx, text, text_mask), project
        )
        keep = keep_mask(original, n * total, flat.device).view(n, total)
        return {"image": Encoded(keep=list(keep), pooler=list(torch.split(flat, units.lens)), kept=list(units.lens))}
