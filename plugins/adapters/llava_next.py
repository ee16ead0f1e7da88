"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``: anyres CLIP crops, newline tokens)."""

from __future__ import annotations

import torch

from tokenreduce.errors import InvalidInputError

from .anyres import encode_anyres_images
from .llava import select_features
from .engine import Family
from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ENCODER_STAGES
from .vision import vision_context


class LlavaNextAdapter(LlavaFamilyAdapter):
    """LLaVA-NeXT: an image is its base view plus a grid of high-resolution crops, packed as
    base tokens, then the unpadded crop grid row by row with a newline token after each row.

    A step's budget applies per image, split between base and crops in proportion to their
    token counts, each part reduced with its own grid; a crop row keeps its newline iff it
    keeps a token (see :mod:`tokenreduce_plugins.adapters.anyres`). ``vision_encoder``
    steps see the packed (unpadded) layout in the vision width; ``projector`` steps the same
    layout in the LLM width. Context: per part, the CLS token of the base view, each token's
    CLS attention and key within its own crop (recomputed from the selected layer), the grid.
    """

    family = Family("llava_next", ("LlavaNextForConditionalGeneration",), fast_prefill=True)

    def num_patches(self, image_sizes) -> list[int]:
        # Imported here: the model's module is loaded whenever a model exists, and importing
        # it at registration would make every `tokenreduce list` pay for it.
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            for s in image_sizes
        ]

    def encode(self, kw: dict) -> dict[str, Encoded]:
        inner = self.inner
        sizes = kw.get("image_sizes")
        if sizes is None:
            raise InvalidInputError("LLaVA-NeXT needs image_sizes (one (height, width) per image) with pixel_values")
        layer, strategy, start = self.feature_selection(kw)
        counts = self.num_patches(sizes)
        pixels = kw["pixel_values"]
        if pixels.dim() == 5:
            pixels = torch.cat([p[:n] for p, n in zip(pixels, counts)], dim=0)
        out = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        selected = select_features(out.hidden_states, layer, start)
        vctx = None
        if self.needs("cls_token", "cls_attention", "keys"):
            vctx = vision_context(inner.vision_tower, out.hidden_states, layer, start, map(self.step, ENCODER_STAGES))

        def pack(feats, newline):
            return inner.pack_image_features(feats, sizes, strategy, image_newline=newline)[0]

        return {"image": encode_anyres_images(self, selected, counts, pack, vctx=vctx)}
