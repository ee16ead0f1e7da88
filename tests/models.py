"""Tiny, seeded, random-weight instances of real transformers model classes for tests.

Every builder returns a model in eval mode built from a small config (CPU, float32 unless
asked otherwise). The weights are drawn with a larger std than the configs' default so
that greedy decoding has clear winners (fewer near-ties between tokens).
Helpers append their own builders here (one function per model family).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, then restore the setting.

    Tiny models: threading costs more than it saves, and on a loaded 2-core runner it
    makes every forward many times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IMAGE_TOKEN = 3
VIDEO_TOKEN = 4
PAD_TOKEN = 0
VOCAB = 96


def _init(model: torch.nn.Module, seed: int, std: float = 0.15) -> torch.nn.Module:
    """Re-draw every weight from a seeded normal (biases and norms included, so nothing is trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


# The decoder size shared by the tiny Llama-, Qwen2-based test models.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    pad_token_id=PAD_TOKEN,
    bos_token_id=1,
    eos_token_id=2,
    rope_theta=100.0,
)


def llama_text_config(**kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY_TEXT, **kw})


def clip_config(image_size: int = 24, patch_size: int = 4, **kw) -> CLIPVisionConfig:
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    cfg.update(kw)
    return CLIPVisionConfig(**cfg)


def tiny_llama(seed: int = 0, attn_implementation: str = "sdpa", **kw) -> LlamaForCausalLM:
    """A 4-layer Llama (GQA 4/2 heads, width 64) for decoder-only tests."""
    cfg = llama_text_config(**kw)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn_implementation)
    return _init(model, seed)


def tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", layers: int = 4, vision_layers: int = 3
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP (24 px, patch 4 -> 6x6 = 36 patches + CLS, ``vision_layers``
    layers), selected layer -2 with the ``default`` strategy (CLS dropped), 2-layer MLP
    projector, Llama decoder. Image token id 3, 36 placeholder tokens per image."""
    cfg = LlavaConfig(
        vision_config=clip_config(num_hidden_layers=vision_layers),
        text_config=llama_text_config(num_hidden_layers=layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _init(model, seed)


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa") -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT layout: CLIP crops of 16 px (patch 4 -> 4x4 = 16 tokens per crop), grid
    pinpoints [[16, 32], [32, 16], [32, 32]] (best fit picks 1x2, 2x1 or 2x2 crops), a newline
    token after each row of the unpadded crop grid."""
    cfg = LlavaNextConfig(
        vision_config=clip_config(image_size=16),
        text_config=llama_text_config(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        projector_hidden_act="gelu",
    )
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _init(model, seed)


def tiny_onevision(
    seed: int = 0, attn_implementation: str = "sdpa", aspect_ratio: str = "anyres_max_9"
) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision layout: SigLIP crops of 16 px (patch 4 -> 4x4 tokens, no CLS, ``full``
    strategy), anyres grid pinpoints as in NeXT, Qwen2 decoder; video token id 4 (frames are
    2x2-pooled to 2x2 = 4 tokens each, plus one newline per video). ``aspect_ratio``
    ``"anyres_max_1"`` makes the model downscale every multi-crop grid (interpolation path)."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4
    )
    text = Qwen2Config(**TINY_TEXT)
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        projector_hidden_act="gelu",
    )
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _init(model, seed)


def media_prompt(rows: list[list[tuple[int, int]]], *, seed: int = 0, row_ids: list[int] | None = None, text: int = 5):
    """Left-padded ``input_ids`` / ``attention_mask`` for rows of text and placeholder runs.

    ``rows[r]`` lists the row's media as ``(placeholder token id, run length)``; each row is
    ``[bos, text..., (run, text...) per item]``. A row's text depends only on ``seed`` and its
    id (``row_ids[r]``, default ``r``), so a row built alone equals the same row in a batch.
    """
    row_ids = list(range(len(rows))) if row_ids is None else row_ids
    built = []
    for rid, items in zip(row_ids, rows):
        gen = torch.Generator().manual_seed(seed * 7919 + rid)
        row = [1] + torch.randint(5, VOCAB, (2 + rid,), generator=gen).tolist()
        for token, length in items:
            row += [token] * length + torch.randint(5, VOCAB, (text,), generator=gen).tolist()
        built.append(row)
    return left_pad(built)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows left-padded with ``PAD_TOKEN`` to the longest."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


def two_image_batch() -> dict:
    """Forward arguments for :func:`tiny_llava`: two rows, one seeded 24-px image each."""
    ids, mask = llava_prompt([1, 1])
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_prompt(image_counts: list[int], tokens_per_image: int = 36, *, seed: int = 0, row_ids: list[int] | None = None):
    """:func:`media_prompt` with ``image_counts[r]`` images of ``tokens_per_image`` placeholders per row."""
    rows = [[(IMAGE_TOKEN, tokens_per_image)] * k for k in image_counts]
    return media_prompt(rows, seed=seed, row_ids=row_ids)


def seeded_pixels(shape: tuple[int, ...], *key: int) -> torch.Tensor:
    """Pixel values that depend only on ``key`` (e.g. row and image index)."""
    gen = torch.Generator().manual_seed(hash(key) % (2**31))
    return torch.randn(shape, generator=gen)


# --- Qwen2-VL / Qwen2.5-VL (tokenreduce_plugins.adapters.qwen_vl) --------------------------------

QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 120, 121, 122, 123
QWEN_VOCAB = 128
QWEN_PATCH = 4  # pixels per patch side in the tiny Qwen configs


def _qwen_text_config() -> dict:
    return dict(
        vocab_size=QWEN_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # head_dim 16: its 8 rotary frequencies are split 2/3/3 over the (t, h, w) M-RoPE axes.
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 100.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN,
    )


def _qwen_tokens() -> dict:
    return dict(
        image_token_id=QWEN_IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO_TOKEN,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )


def _qwen_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    _init(model, seed)
    # The vision tower's norms are named norm1/norm2/ln_q: give them scales near 1 as well.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("visual" in name and ".norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded random-weight ``Qwen2_5_VLForConditionalGeneration``.

    Vision: 2 blocks (block 0 windowed, block 1 full attention), 4x4-pixel patches,
    attention windows of 2x2 merged tokens, so an image of a few dozen patches already
    exercises the window reordering. Text: 3 decoder layers, width 64, 3-D M-RoPE.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=QWEN_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=4 * QWEN_PATCH,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        text_config=_qwen_text_config(),
        **_qwen_tokens(),
    )
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _qwen_init(model, seed)


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded random-weight ``Qwen2VLForConditionalGeneration`` (no windows, LayerNorm merger)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=QWEN_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=_qwen_text_config(),
        **_qwen_tokens(),
    )
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _qwen_init(model, seed)


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded random-weight ``Qwen3VLForConditionalGeneration`` (DeepStack after decoder layer 0)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _qwen_text_config()
    text.update(head_dim=16)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    for key in ("bos_token_id", "eos_token_id"):
        text.pop(key)
    cfg = Qwen3VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=QWEN_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        text_config=text,
        **_qwen_tokens(),
    )
    model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return _qwen_init(model, seed)


def qwen_vl_inputs(
    images, videos=None, *, seed: int = 0, text: int = 3, padding_side: str = "left", frame_runs: bool = False
) -> dict:
    """Processor-like inputs for the tiny Qwen models.

    Args:
        images: per batch row, a list of image patch grids ``(h, w)`` (even numbers; an
            image gives ``h * w / 4`` placeholder tokens between vision start/end tokens).
        videos: optional, per batch row, a list of video grids ``(t, h, w)`` (after the images).
        text: text tokens before each image/video and after the last one (row ``b`` gets ``b`` more).
        padding_side: rows of different lengths are padded on this side.
        frame_runs: Qwen3-VL layout: each video frame is its own vision start/end run after a
            timestamp token (Qwen2/2.5-VL: one run per video).

    Returns input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
    (and pixel_values_videos, video_grid_thw when there are videos), all on CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    videos = videos or [[] for _ in images]
    seqs, image_grids, video_grids = [], [], []
    for b, (row_images, row_videos) in enumerate(zip(images, videos)):
        ids: list[int] = []
        for grid, token, out in [((1, *g), QWEN_IMAGE_TOKEN, image_grids) for g in row_images] + [
            (tuple(g), QWEN_VIDEO_TOKEN, video_grids) for g in row_videos
        ]:
            t, h, w = grid
            ids += torch.randint(5, 100, (text,), generator=gen).tolist()
            runs = [h * w // 4] * t if frame_runs and token == QWEN_VIDEO_TOKEN else [t * h * w // 4]
            for k, n in enumerate(runs):
                ids += [100 + k] if len(runs) > 1 else []  # a timestamp token before each frame
                ids += [QWEN_VISION_START] + [token] * n + [QWEN_VISION_END]
            out.append(grid)
        ids += torch.randint(5, 100, (text + b,), generator=gen).tolist()
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        input_ids[b, cols] = torch.tensor(s)
        mask[b, cols] = 1
    mm = torch.zeros_like(input_ids, dtype=torch.int)
    mm[input_ids == QWEN_IMAGE_TOKEN] = 1
    mm[input_ids == QWEN_VIDEO_TOKEN] = 2
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
    width = 3 * 2 * QWEN_PATCH * QWEN_PATCH  # channels x temporal patch x patch x patch
    for grids, key in ((image_grids, "image"), (video_grids, "video")):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            out["pixel_values" if key == "image" else "pixel_values_videos"] = torch.randn(n, width, generator=gen)
            out[f"{key}_grid_thw"] = torch.tensor(grids)
    return out
