"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images and videos."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.ops import gather_rows, keep_mask_from
from tokenreduce.stages import Stage

from . import compat
from .anyres import encode_anyres_images
from .llava import select_features
from .llava_base import ENCODER_STAGES, Encoded, LlavaFamilyAdapter, per_row
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

    name = "llava_onevision"
    fast_prefill = True
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities: ClassVar[dict[str, str]] = {"image": "image_token_id", "video": "video_token_id"}
    pixel_args: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")

    def encoder_context_fields(self) -> set[str]:
        fields = super().encoder_context_fields()
        # A whole video per row (per_video) has frames; images and single frames have none.
        return fields | {"frames", "frame_index"} if self.pipeline.video_budget == "per_video" else fields

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
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        grid = (math.ceil(side / 2), math.ceil(side / 2))
        pooled_p = inner.apply_pooling(inner.multi_modal_projector(selected))  # stock order: exact
        per_frame = pooled_p.shape[1]
        step_v, step_p = (self.step(st) for st in ENCODER_STAGES)
        ctx_fields = {}
        if vctx is not None:
            ctx_fields["keys"] = inner.apply_pooling(vctx.keys)
            if vctx.cls_attention is not None:
                ctx_fields["cls_attention"] = inner.apply_pooling(vctx.cls_attention.unsqueeze(-1))[..., 0]
                ctx_fields["cls_token"] = vctx.cls_token
            if vctx.shallow_cls_attention is not None:
                ctx_fields[SHALLOW_CLS_KEY] = inner.apply_pooling(vctx.shallow_cls_attention.unsqueeze(-1))[..., 0]
        video_mode = self.pipeline.video_budget == "per_video"
        n_items = [per_frame * f + 1] * b
        text, text_mask = self.text_context("video", n_items)

        def units(x: torch.Tensor) -> torch.Tensor:
            """(B*F, n, ...) frames -> rows of the budget unit."""
            return x.reshape(b, f * x.shape[1], *x.shape[2:]) if video_mode else x

        rows = b if video_mode else b * f
        if text is not None and not video_mode:
            text, text_mask = text.repeat_interleave(f, 0), text_mask.repeat_interleave(f, 0)
        unit_len = per_frame * (f if video_mode else 1)
        unit_grid = (grid[0] * f, grid[1]) if video_mode else grid
        feats = units(pooled_p)
        idx = torch.arange(unit_len, device=feats.device).expand(rows, unit_len)
        valid = torch.ones(rows, unit_len, dtype=torch.bool, device=feats.device)
        ctx_units = {k: (units(v) if k != "cls_token" else v) for k, v in ctx_fields.items()}
        if video_mode and "cls_token" in ctx_units:  # one CLS per video: the mean of its frames'
            ctx_units["cls_token"] = ctx_units["cls_token"].view(b, f, -1).mean(1)
        for stage, step in zip(ENCODER_STAGES, (step_v, step_p)):
            if step is None:
                continue
            src = units(inner.apply_pooling(selected)) if stage is Stage.VISION_ENCODER else feats
            ctx = ReductionContext(
                stage=stage,
                grid=unit_grid if valid.shape[1] == unit_len else None,  # while every token is there
                text_embeds=text,
                text_mask=text_mask,
                cls_token=ctx_units.get("cls_token"),
                cls_attention=None if "cls_attention" not in ctx_units else gather_rows(ctx_units["cls_attention"].unsqueeze(-1), idx).squeeze(-1),
                keys=None if "keys" not in ctx_units else gather_rows(ctx_units["keys"], idx),
                extra={} if SHALLOW_CLS_KEY not in ctx_units else {
                    SHALLOW_CLS_KEY: gather_rows(ctx_units[SHALLOW_CLS_KEY].unsqueeze(-1), idx).squeeze(-1)
                },
                frames=f if video_mode else None,
                frame_index=idx.clamp(min=0) // per_frame if video_mode else None,
            )
            red, seconds = self.run_step(step, src, valid, ctx)
            before = valid.sum(1).tolist()
            idx = gather_rows(idx.unsqueeze(-1), red.indices).squeeze(-1).masked_fill(~red.valid, -1)
            counts, _, info = per_row(red)
            self.add_record(step, before, counts, [idx[i, : counts[i]] for i in range(rows)], info, seconds)
            if stage is Stage.PROJECTOR:
                feats = red.tokens
            elif not red.info.get("identity"):
                feats = inner.multi_modal_projector(red.tokens)
            valid = red.valid
        # Back to videos: each video's kept tokens in order, then its newline.
        counts = valid.sum(1)
        keep_units = keep_mask_from(idx, valid, unit_len)  # (rows, unit_len)
        keep = keep_units.reshape(b, f * per_frame)
        keep = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool, device=keep.device)], dim=1)
        flat = feats[valid]  # kept features of all units, in order
        per_video = counts.view(b, -1).sum(1).tolist()
        parts = []
        for chunk in torch.split(flat, per_video):  # per video: its tokens, then its newline
            parts += [chunk, inner.image_newline[None].to(chunk.dtype)]
        pooler = torch.cat(parts).unsqueeze(0)
        return Encoded(keep=list(keep), pooler=pooler)
