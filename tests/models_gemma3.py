"""A tiny, seeded Gemma 3 (``Gemma3ForConditionalGeneration``) and its prompts, for the Gemma 3 adapter tests.

Same conventions as :mod:`models` (real transformers classes, small configs, every weight
redrawn by :func:`models._init`). The decoder alternates sliding-window and full-attention
layers with a window (12) shorter than one image's run of placeholders (16), so the
sliding layers cut the bidirectional image blocks, as Gemma 3's masks define them.
"""

from __future__ import annotations

import torch
from models import PAD_TOKEN, _init, left_pad, seeded_pixels
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

GEMMA_EOS, GEMMA_BOS = 1, 2  # Gemma's own order: eos 1, bos 2
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 3, 4, 5
GEMMA_VOCAB = 96
GEMMA_SIDE = 32  # image pixels per side: SigLIP patches of 4 -> an 8x8 grid
GEMMA_TOKENS = 16  # mm_tokens_per_image: the 8x8 grid average-pooled 2x2 -> 4x4
WINDOW = 12


def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa") -> Gemma3ForConditionalGeneration:
    """Gemma 3 layout: SigLIP (32 px, patch 4 -> 8x8 patches, no CLS), projector pooling to 4x4 =
    16 tokens per image then RMSNorm + linear, a 4-layer Gemma 3 decoder (sliding, full, sliding,
    full; window 12; rope bases 100 local / 1000 global). Image token 3 between boi 4 and eoi 5."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=GEMMA_SIDE, patch_size=4,
    )
    text = Gemma3TextConfig(
        vocab_size=GEMMA_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        bos_token_id=GEMMA_BOS,
        eos_token_id=GEMMA_EOS,
    )
    cfg = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=GEMMA_TOKENS,
        image_token_index=GEMMA_IMAGE,
        boi_token_index=GEMMA_BOI,
        eoi_token_index=GEMMA_EOI,
    )
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _init(model, seed)


def gemma3_inputs(images: list[int], rows: list[int], *, text: int = 3) -> dict:
    """Processor-like, left-padded inputs for rows ``rows`` of a fixed batch with ``images[r]`` images in row ``r``.

    A row is ``[bos, text..., (boi, image x 16, eoi, text...) per image]``; its text and pixels
    depend only on its id, so a row alone equals the same row in a batch. ``token_type_ids``
    is 1 on the image placeholders, as Gemma 3's processor returns it.
    """
    built, pixels = [], []
    for r in rows:
        gen = torch.Generator().manual_seed(7919 + r)
        row = [GEMMA_BOS] + torch.randint(6, GEMMA_VOCAB, (2 + r,), generator=gen).tolist()
        for i in range(images[r]):
            row += [GEMMA_BOI] + [GEMMA_IMAGE] * GEMMA_TOKENS + [GEMMA_EOI]
            row += torch.randint(6, GEMMA_VOCAB, (text + i,), generator=gen).tolist()
            pixels.append(seeded_pixels((3, GEMMA_SIDE, GEMMA_SIDE), r, i))
        built.append(row)
    ids, mask = left_pad(built)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == GEMMA_IMAGE).long()}
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out
