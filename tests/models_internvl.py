"""A tiny, seeded ``InternVLForConditionalGeneration`` and processor-like inputs for it (see tests/models.py)."""

from __future__ import annotations

import torch
from models import TINY_TEXT, VOCAB, _init, left_pad, seeded_pixels
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

IVL_IMAGE_TOKEN, IVL_START, IVL_END = 3, 4, 5  # <IMG_CONTEXT>, <img>, </img>
IVL_TILE = 32  # pixels per tile side: 8x8 patches of 4 px, pixel-shuffled to 4x4 = 16 tokens per tile
IVL_TOKENS_PER_TILE = 16


def tiny_internvl(seed: int = 0, attn_implementation: str = "sdpa", use_qk_norm: bool = False):
    """InternVL layout at toy size: InternViT (32-px tiles, patch 4 -> 8x8 patches + [CLS], 3 layers,
    layer scale), ``vision_feature_layer`` -1 with the ``default`` strategy ([CLS] dropped), pixel
    shuffle 0.5 (2x2 patches -> one 128-wide token), LayerNorm + 2-layer MLP projector, Qwen2
    decoder. ``use_qk_norm``: InternViT-6B's RMS q/k norms (with RMS layer norms)."""
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IVL_TILE, patch_size=4, use_qk_norm=use_qk_norm, norm_type="rms_norm" if use_qk_norm else "layer_norm",
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**TINY_TEXT).to_dict(),
        image_token_id=IVL_IMAGE_TOKEN,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    _init(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # q/k RMS norms are named q_norm / k_norm: scales near 1 as for the other norms
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def internvl_inputs(rows: list[list[int]], row_ids: list[int] | None = None, *, text: int = 4) -> dict:
    """Left-padded inputs as the InternVL processor lays them out.

    ``rows[r]`` lists the tile count of each image of row ``r`` (tiles + thumbnail, e.g. 3 =
    2 tiles + thumbnail; 1 = a small image, or one video frame): each image is ``<img>``, 16
    placeholders per tile, ``</img>``, then text. A row's tokens and pixels depend only on its
    id (``row_ids[r]``, default ``r``), so a row built alone equals the same row in a batch.
    """
    row_ids = list(range(len(rows))) if row_ids is None else row_ids
    built, pixels = [], []
    for rid, tiles in zip(row_ids, rows):
        gen = torch.Generator().manual_seed(1000 + rid)
        row = [1] + torch.randint(6, VOCAB, (2 + rid,), generator=gen).tolist()
        for i, k in enumerate(tiles):
            row += [IVL_START] + [IVL_IMAGE_TOKEN] * (k * IVL_TOKENS_PER_TILE) + [IVL_END]
            row += torch.randint(6, VOCAB, (text,), generator=gen).tolist()
            pixels.append(seeded_pixels((k, 3, IVL_TILE, IVL_TILE), rid, i))
        built.append(row)
    ids, mask = left_pad(built)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}
