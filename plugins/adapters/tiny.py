"""The embedded default model: a tiny, seeded, random-weight LLaVA-1.5 (no download).

``build_tiny_llava(seed)`` returns a real ``LlavaForConditionalGeneration`` (CLIP vision
tower, 2-layer MLP projector, Llama decoder) with the LLaVA-1.5 token layout scaled down
in width and depth only: a 336 x 336 image cut into 14-pixel patches, a 24 x 24 grid
(576 image tokens per image, as LLaVA-1.5's CLIP-L/14-336) plus a CLS token,
``vision_feature_layer = -2``, the ``default`` strategy; and
processor-free inputs (``input_ids`` with the 576 image placeholders between text tokens,
``attention_mask``, ``pixel_values``) ready for ``model(**inputs)`` or
``model.generate(**inputs)``. Deterministic for a given seed, CPU or CUDA.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 3
GRID = 24  # patches per side, as LLaVA-1.5 at 336 px
PATCH = 14  # pixels per patch side, as CLIP-L/14: a 336-pixel image


def build_tiny_llava(
    seed: int = 0,
    *,
    layers: int = 4,
    prompt_tokens: int = 12,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A tiny LLaVA-1.5 and one prompt for it.

    Args:
        seed: seeds the weights, the pixels and the text tokens.
        layers: decoder layers (an ``llm_layer`` step needs ``layer < layers``).
        prompt_tokens: text tokens after the image (before it: ``[bos, 4 tokens]``).
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        device, dtype: where and in which precision the model and inputs live.

    Returns:
        ``(model, inputs)``: the model in eval mode and a dict with ``input_ids (1, L)``,
        ``attention_mask (1, L)`` and ``pixel_values (1, 3, 336, 336)``; ``L = 5 + 576 +
        prompt_tokens``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=GRID * PATCH, patch_size=PATCH, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # layer norms / RMS norms near 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    model = model.to(device=device, dtype=dtype).eval()
    before = [1] + torch.randint(5, 128, (4,), generator=gen).tolist()
    after = torch.randint(5, 128, (prompt_tokens,), generator=gen).tolist()
    ids = torch.tensor([before + [IMAGE_TOKEN_ID] * (GRID * GRID) + after], device=device)
    pixels = torch.randn(1, 3, GRID * PATCH, GRID * PATCH, generator=gen).to(device=device, dtype=dtype)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return model, inputs
