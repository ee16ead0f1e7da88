"""The benchmarked models: published configurations, fast random-weight builds, synthetic prompts.

Every model is a stock transformers class (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``) built from its published configuration;
nothing is downloaded. Weights are random: the
compute and memory traffic of a forward pass do not depend on their values.

Building a 7B model with transformers' default initialisation takes minutes; here it
is instantiated directly on the device in the target dtype with initialisation
disabled (``transformers.initialization.no_init_weights``) and then every parameter is
filled in one pass (normal(0, 0.02), norms 1), which takes seconds.

``quick=True`` swaps in tiny configurations of the same classes (CPU tests).

A spec with ``frames`` is a video row: one synthetic video of ``frames`` frames per prompt
(LLaVA-OneVision: each frame a 384x384 SigLIP crop, 27x27 patches 2x2-pooled to 14x14 =
196 tokens, then one newline token per video).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

LLAVA = "llava"
LLAVA_NEXT = "llava_next"
QWEN = "qwen2_5_vl"
LLAVA_ONEVISION = "llava_onevision"

# Text around the image: about the length of the LLaVA-1.5 / Qwen chat templates with a
# one-line question (FastV's official code hard-codes 35 tokens before the image).
PREFIX_TOKENS = 35
SUFFIX_TOKENS = 20


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    Attributes:
        key: short name used in results (``llava-1.5-7b``).
        title: what it stands for.
        family: ``llava``, ``llava_next``, ``qwen2_5_vl`` or ``llava_onevision``.
        image_size: ``(height, width)`` of the synthetic input image (of each frame) in pixels.
        frames: frames of the synthetic video (0: an image model row).
    """

    key: str
    title: str
    family: str
    image_size: tuple[int, int]
    frames: int = 0

    @property
    def video(self) -> bool:
        return self.frames > 0


FULL_SPECS = (
    ModelSpec("llava-1.5-7b", "LLaVA-1.5-7B (CLIP-L/336 + Llama-7B), 576 image tokens", LLAVA, (336, 336)),
    ModelSpec("llava-next-7b", "LLaVA-NeXT-7B (vicuna), 672x672 image (2x2 tiles + base)", LLAVA_NEXT, (672, 672)),
    ModelSpec("qwen2.5-vl-7b", "Qwen2.5-VL-7B, 1344x1344 image", QWEN, (1344, 1344)),
    ModelSpec(
        "llava-onevision-7b-video",
        "LLaVA-OneVision-7B (SigLIP so400m/384 + Qwen2-7B), 32-frame video, 6,272 video tokens",
        LLAVA_ONEVISION,
        (384, 384),
        frames=32,
    ),
)

QUICK_SPECS = (
    ModelSpec("llava-1.5-7b", "tiny LLaVA-1.5 layout (CPU test config)", LLAVA, (48, 48)),
    ModelSpec("llava-next-7b", "tiny LLaVA-NeXT layout (CPU test config)", LLAVA_NEXT, (48, 48)),
    ModelSpec("qwen2.5-vl-7b", "tiny Qwen2.5-VL layout (CPU test config)", QWEN, (48, 48)),
    ModelSpec(
        "llava-onevision-7b-video", "tiny LLaVA-OneVision layout, 16-frame video (CPU test config)", LLAVA_ONEVISION, (48, 48), 16
    ),
)


def model_specs(quick: bool) -> tuple[ModelSpec, ...]:
    return QUICK_SPECS if quick else FULL_SPECS


def image_specs(quick: bool) -> tuple[ModelSpec, ...]:
    return tuple(s for s in model_specs(quick) if not s.video)


def video_specs(quick: bool) -> tuple[ModelSpec, ...]:
    return tuple(s for s in model_specs(quick) if s.video)


# -- configurations ----------------------------------------------------------------------


def _clip(quick: bool, image_size: int) -> Any:
    from transformers import CLIPVisionConfig

    if quick:
        return CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8 if image_size >= 48 else 4,
            projection_dim=32,
        )
    # openai/clip-vit-large-patch14-336
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _llama(quick: bool) -> Any:
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    # lmsys/vicuna-7b-v1.5 (the LLaVA-1.5 / NeXT-vicuna decoder), vocabulary as in llava-hf
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _onevision(quick: bool, image_size: int) -> Any:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    if quick:
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=4,
            vision_use_head=False,
        )
        text = Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=160,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        ids = dict(image_token_id=150, video_token_id=151)
    else:
        # llava-hf/llava-onevision-qwen2-7b-ov-hf: google/siglip-so400m-patch14-384 without
        # its last layer (26 of 27, "full" features of the last kept layer), Qwen2-7B.
        vision = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        )
        text = Qwen2Config(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152128,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        )
        ids = dict(image_token_id=151646, video_token_id=151647)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        **ids,
    )


def build_config(spec: ModelSpec, quick: bool) -> Any:
    """The transformers config of ``spec`` (published sizes, or tiny ones when ``quick``)."""
    from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

    if spec.family == LLAVA_ONEVISION:
        return _onevision(quick, spec.image_size[0])
    image_token = 100 if quick else 32000
    if spec.family == LLAVA:
        return LlavaConfig(
            vision_config=_clip(quick, spec.image_size[0]),
            text_config=_llama(quick),
            image_token_index=image_token,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=0,
        )
    if spec.family == LLAVA_NEXT:
        tile = 24 if quick else 336
        pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
        return LlavaNextConfig(
            vision_config=_clip(quick, tile),
            text_config=_llama(quick),
            image_token_index=image_token,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=pinpoints,
            pad_token_id=0,
        )
    if spec.family == QWEN:
        if quick:
            text = dict(
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=160,
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            )
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=4,
                out_hidden_size=64,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                fullatt_block_indexes=[1],
            )
            ids = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
        else:
            # Qwen/Qwen2.5-VL-7B-Instruct
            text = dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                max_position_embeddings=128000,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                bos_token_id=151643,
                eos_token_id=151645,
                pad_token_id=151643,
            )
            vision = dict(
                depth=32,
                hidden_size=1280,
                intermediate_size=3420,
                num_heads=16,
                out_hidden_size=3584,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
                hidden_act="silu",
            )
            ids = dict(
                image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
            )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown model family {spec.family!r}")


def model_class(spec: ModelSpec) -> type:
    import transformers

    name = {
        LLAVA: "LlavaForConditionalGeneration",
        LLAVA_NEXT: "LlavaNextForConditionalGeneration",
        QWEN: "Qwen2_5_VLForConditionalGeneration",
        LLAVA_ONEVISION: "LlavaOnevisionForConditionalGeneration",
    }[spec.family]
    return getattr(transformers, name)


# -- building ------------------------------------------------------------------------------


def build_model(spec: ModelSpec, *, device: str, dtype: torch.dtype, quick: bool, seed: int = 0) -> torch.nn.Module:
    """The model on ``device`` in ``dtype`` with seeded random weights, in eval mode, ``sdpa`` attention."""
    from transformers.initialization import no_init_weights

    config = build_config(spec, quick)
    cls = model_class(spec)
    # Allocating directly on the device in the target dtype with init disabled: seconds, not minutes.
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    fill_weights(model, seed=seed, std=0.02 if not quick else 0.15)
    return model.eval()


@torch.no_grad()
def fill_weights(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Norm weights 1 and biases 0, every other parameter normal(0, std); one pass on the device."""
    first = next(model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower() or "ln_" in name.lower()
        if is_norm and leaf == "weight":
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- inputs --------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A synthetic batch: the forward kwargs and where the image tokens are.

    Attributes:
        kwargs: ``input_ids``, ``attention_mask``, pixel inputs (model specific).
        image_tokens: image (video) placeholder tokens per row (``N``; a video's newline included).
        image_start: column of the first image token (the same in every row).
        prompt_len: tokens per row.
        extra: for a video, ``frames``, ``frame_tokens`` (per frame) and ``video_tokens``
            (``frames x frame_tokens``: what a per-video budget counts).
    """

    kwargs: dict[str, Any]
    image_tokens: int
    image_start: int
    prompt_len: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.kwargs["input_ids"].shape[0])


def frame_token_count(config: Any) -> int:
    """Tokens of one LLaVA-OneVision video frame: the patch grid 2x2-pooled (``ceil(side / 2)`` squared)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2) ** 2


def video_token_count(spec: ModelSpec, config: Any) -> int:
    """Frame tokens of one video of ``spec.frames`` frames (what a video budget counts; no newline)."""
    return spec.frames * frame_token_count(config)


def image_token_count(spec: ModelSpec, config: Any) -> int:
    """Placeholder tokens one image (video) of ``spec.image_size`` takes (what the HF processor would insert)."""
    h, w = spec.image_size
    if spec.family == LLAVA_ONEVISION:
        if not spec.video:
            raise ValueError(f"{spec.key}: the LLaVA-OneVision spec is a video row; give it frames")
        return video_token_count(spec, config) + 1  # the frames' tokens, then one newline per video
    if spec.family == LLAVA:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side
    if spec.family == LLAVA_NEXT:
        tile = config.vision_config.image_size
        p = tile // config.vision_config.patch_size
        if [h, w] not in [list(x) for x in config.image_grid_pinpoints]:
            raise ValueError(f"image size {h}x{w} must be one of the grid pinpoints {config.image_grid_pinpoints}")
        # Base tile (p*p) plus the (h/tile*p) x (w/tile*p) crop grid with a newline token per row.
        # An image that equals a pinpoint needs no resize padding, so nothing is unpadded.
        rows, cols = h // tile * p, w // tile * p
        return p * p + rows * (cols + 1)
    if spec.family == QWEN:
        v = config.vision_config
        gh, gw = h // v.patch_size, w // v.patch_size
        return gh * gw // (v.spatial_merge_size**2)
    raise ValueError(spec.family)


def make_inputs(spec: ModelSpec, config: Any, *, batch: int, device: str, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """``batch`` identical-layout rows: text prefix, one image, text suffix (no padding)."""
    gen = torch.Generator().manual_seed(seed)
    text_cfg = config.text_config
    n = image_token_count(spec, config)
    # Ordinary text ids: clear of the special ids placed at the top of the tiny vocabularies.
    hi = min(text_cfg.vocab_size, 30000) - 30
    prefix = torch.randint(3, hi, (batch, PREFIX_TOKENS), generator=gen)
    suffix = torch.randint(3, hi, (batch, SUFFIX_TOKENS), generator=gen)
    prefix[:, 0] = text_cfg.bos_token_id if text_cfg.bos_token_id is not None else 1
    h, w = spec.image_size
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if spec.family == LLAVA_ONEVISION:
        # A video prompt: text, the video's placeholders (frame tokens + newline), text.
        video = torch.full((batch, n), config.video_token_id, dtype=torch.long)
        ids = torch.cat([prefix, video, suffix], dim=1)
        start = PREFIX_TOKENS
        kwargs["pixel_values_videos"] = torch.randn(batch, spec.frames, 3, h, w, generator=gen)
        extra = {"frames": spec.frames, "frame_tokens": frame_token_count(config), "video_tokens": n - 1}
    elif spec.family in (LLAVA, LLAVA_NEXT):
        image = torch.full((batch, n), config.image_token_index, dtype=torch.long)
        ids = torch.cat([prefix, image, suffix], dim=1)
        start = PREFIX_TOKENS
        if spec.family == LLAVA:
            kwargs["pixel_values"] = torch.randn(batch, 3, h, w, generator=gen)
        else:
            tile = config.vision_config.image_size
            tiles = 1 + (h // tile) * (w // tile)
            kwargs["pixel_values"] = torch.randn(batch, tiles, 3, tile, tile, generator=gen)
            kwargs["image_sizes"] = torch.tensor([[h, w]] * batch)
    else:
        v = config.vision_config
        gh, gw = h // v.patch_size, w // v.patch_size
        begin = torch.full((batch, 1), config.vision_start_token_id, dtype=torch.long)
        end = torch.full((batch, 1), config.vision_end_token_id, dtype=torch.long)
        image = torch.full((batch, n), config.image_token_id, dtype=torch.long)
        ids = torch.cat([prefix, begin, image, end, suffix], dim=1)
        start = PREFIX_TOKENS + 1
        patch_dim = 3 * v.temporal_patch_size * v.patch_size**2
        kwargs["pixel_values"] = torch.randn(batch * gh * gw, patch_dim, generator=gen)
        kwargs["image_grid_thw"] = torch.tensor([[1, gh, gw]] * batch)
    kwargs["input_ids"] = ids
    kwargs["attention_mask"] = torch.ones_like(ids)
    for k, v in list(kwargs.items()):
        kwargs[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    return Inputs(kwargs=kwargs, image_tokens=n, image_start=start, prompt_len=int(ids.shape[1]), extra=extra)


# -- structure (for the roofline and the official-style paths) -------------------------------


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``LlamaModel`` / ``Qwen2_5_VLTextModel``) of a VLM."""
    inner = model.model
    return inner.language_model


def vision_modules(model: torch.nn.Module, spec: ModelSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(vision tower, projector)`` modules."""
    inner = model.model
    if spec.family == QWEN:
        return inner.visual, inner.visual.merger
    return inner.vision_tower, inner.multi_modal_projector
