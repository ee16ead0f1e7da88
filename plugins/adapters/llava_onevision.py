"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images and videos."""

from __future__ import annotations

import math
import torch

from tokenreduce.errors import InvalidInputError
from tokenreduce.stages import Stage

from . import compat
from .anyres import encode_anyres_images
from .llava import select_features
from .engine import Family
from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ENCODER_STAGES
from .units import ContextSource, Units, keep_mask
from .vision import SHALLOW_CLS_KEY, vision_context


class LlavaOnevisionAdapter(LlavaFamilyAdapter):
    """LLaVA-OneVision: images as in LLaVA-NeXT (base + crop grid + newlines, downscaled by
    ``anyres_max_9`` when large; single-view images in multi-image prompts are base + one
    newline), videos as frames of 2x2-pooled patch grids followed by one newline per video.

    Images: per-image budget split between base and crops (see
    :mod:`tokenreduce_plugins.adapters.anyres`). For crop grids the model downscales,
    ``vision_encoder`` steps see the grid downscaled in the vision width (before the
    projector instead of after it, the only deviation from the stock order).

    Videos: ``pipeline.video_budget`` decides the unit: ``per_frame`` (default) reduces each
    frame's pooled grid on its own budget (rows = frames, ``context.grid`` = the frame grid);
    ``per_video`` reduces all of a video's frame tokens together on one budget
    (``context.grid`` = the frames stacked vertically). ``vision_encoder`` steps see the
    frames pooled in the vision width (the model pools after the projector), so the budget
    counts the same tokens at both stages. The video's trailing newline is always kept.
    SigLIP has no [CLS] token: ``cls_token``/``cls_attention`` are not available.
    """

    family = Family(
        "llava_onevision",
        ("LlavaOnevisionForConditionalGeneration",),
        placeholders=(("image", "image_token_id"), ("video", "video_token_id")),
        pixel_args=("pixel_values", "pixel_values_videos"),
        fast_prefill=True,
    )

    def encode(self, kw: dict) -> dict[str, Encoded]:
        layer, strategy, start = self.feature_selection(kw)
        out = {}
        if kw.get("pixel_values") is not None:
            out["image"] = self._images(kw, layer, strategy, start)
        if kw.get("pixel_values_videos") is not None:
            out["video"] = self._videos(kw["pixel_values_videos"], layer, start)
        return out

    def native_pooler(self, modality, pooler):
        # Releases whose forward appends each video's newline itself get the features without it.
        if modality == "video" and compat.forward_adds_video_newline(self.inner):
            return pooler[:, :-1]
        return pooler

    def _tower(self, pixels, layer, start):
        tower = self.inner.vision_tower
        out = tower(pixels, output_hidden_states=True, return_dict=True)
        selected = select_features(out.hidden_states, layer, start)
        vctx = None
        if self.needs("cls_token", "cls_attention", "keys"):
            vctx = vision_context(tower, out.hidden_states, layer, start, map(self.step, ENCODER_STAGES))
        return selected, vctx

    def _images(self, kw, layer, strategy, start) -> Encoded:
        # Imported here, not at registration (see LlavaNextAdapter.num_patches).
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        inner = self.inner
        sizes = kw.get("image_sizes")
        if sizes is None:
            raise InvalidInputError("LLaVA-OneVision needs image_sizes (one (height, width) per image) with pixel_values")
        per_sample = kw.get("batch_num_images")
        patching = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
        counts = [
            image_size_to_num_patches(s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            if p else 1
            for s, p in zip(sizes, patching)
        ]
        pixels = kw["pixel_values"]
        if pixels.dim() == 5:
            pixels = torch.cat([p[:n] for p, n in zip(pixels, counts)], dim=0)
        selected, vctx = self._tower(pixels, layer, start)
        ratio = cfg.vision_aspect_ratio  # what the stock model uses (it does not forward the kwarg)

        def pack(feats, newline):
            return inner.pack_image_features(feats, sizes, image_newline=newline, vision_aspect_ratio=ratio)[0]

        return encode_anyres_images(self, selected, counts, pack, vctx=vctx)

    def _videos(self, pixels: torch.Tensor, layer, start) -> Encoded:
        inner = self.inner
        b, f = pixels.shape[:2]
        selected, vctx = self._tower(pixels.flatten(0, 1), layer, start)
        side = math.ceil(self.model.config.vision_config.image_size / self.model.config.vision_config.patch_size / 2)
        pooled_p = inner.apply_pooling(inner.multi_modal_projector(selected))  # stock order: exact
        per_frame, dev = pooled_p.shape[1], pooled_p.device
        whole = self.pipeline.video_budget == "per_video"
        text, text_mask = self.text_context("video", [per_frame * f + 1] * b)
        # A unit per frame, or per video (its frames stacked); the "row" of a token is its video.
        video_of_token = torch.arange(b, device=dev).repeat_interleave(f * per_frame)
        units = Units.from_grids([(f * per_frame, (f, side, side))] * b, whole, True, video_of_token)
        source = ContextSource(per_item={"text_embeds": text, "text_mask": text_mask} if text is not None else {})
        if vctx is not None:  # the tower's context, pooled like the features (the model pools after the projector)
            def pool(x: torch.Tensor) -> torch.Tensor:
                return inner.apply_pooling(x.unsqueeze(-1))[..., 0] if x.dim() == 2 else inner.apply_pooling(x)

            fields = {"keys": vctx.keys, "cls_attention": vctx.cls_attention, f"extra.{SHALLOW_CLS_KEY}": vctx.shallow_cls_attention}
            source.per_token = {k: pool(v).flatten(0, 1) for k, v in fields.items() if v is not None}
            if vctx.cls_token is not None:  # a whole video's [CLS]: the mean of its frames'
                source.per_unit["cls_token"] = vctx.cls_token.view(b, f, -1).mean(1) if whole else vctx.cls_token

        def project(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            return inner.multi_modal_projector(x) if reduced else pooled_p.flatten(0, 1)

        first = inner.apply_pooling(selected).flatten(0, 1) if self.step(Stage.VISION_ENCODER) is not None else None
        flat, units, original = self.reduce_units(first if first is not None else pooled_p.flatten(0, 1), units, source, project)
        # Back to videos: each video's kept tokens in order, then its newline (always kept).
        keep = keep_mask(original, b * f * per_frame, dev).view(b, f * per_frame)
        keep = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
        per_video = units.item_lengths(b)
        parts = []
        for chunk in torch.split(flat, per_video):
            parts += [chunk, inner.image_newline[None].to(chunk.dtype)]
        return Encoded(keep=list(keep), pooler=torch.cat(parts).unsqueeze(0), kept=[n + 1 for n in per_video])
