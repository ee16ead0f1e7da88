"""Adapter for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, 2x2 patch merger, 3-D M-RoPE.

Served per forward call (:mod:`.serving`), positions ``original`` by default: each kept token
keeps the M-RoPE id the stock model computes on the unreduced prompt (``compact`` gives
1-D ids: with M-RoPE an image advances the position by ``max(h, w)`` however many tokens it
keeps, so only a 1-D renumbering shortens anything). Units (:mod:`.qwen_vision`): an image;
a video's frames (``video_budget: per_frame``) or the whole video (``per_video``: its frames
stacked, grid ``(t * h, w)``). ``vision_encoder`` steps reduce merge groups (the merger's
input: four patches side by side, raster order); ``projector`` steps the merger's output.
Qwen3-VL's DeepStack features follow the kept tokens; ``llm_layer`` steps must come after
its DeepStack layers. Context: ``grid``, ``positions`` ``(U, N, 3)``, ``text_embeds`` /
``text_mask`` (the unit's whole sequence), ``frames``; ``extra``: ``modality``, ``rows``, ``items``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from tokenreduce import Stage

from . import compat, varlen_attention
from .engine import Family, bind
from .qwen_vision import QwenVision, meta_of
from .serving import ForwardServing, Prompt

# Arguments of the stock forward that its feature getters do not take.
_FORWARD_ONLY = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "labels", "use_cache",
                           "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                           "second_per_grid_ts", "logits_to_keep", "mm_encoder_outputs", "return_dict"})


class QwenVLAdapter(ForwardServing):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: all three stages with 3-D M-RoPE bookkeeping (see the module docs)."""

    family = Family(
        "qwen-vl",
        ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
         "Qwen2_5_VLModel", "Qwen2VLModel", "Qwen3VLModel"),
        tower="visual",
        projector="visual.merger",
        placeholders=(("image", "image_token_id"), ("video", "video_token_id")),
        pixel_args=("pixel_values", "pixel_values_videos"),
        media_args=("image_grid_thw", "video_grid_thw", "second_per_grid_ts"),
        positions="original",
        cls=False,
        vision_keys=False,
        token_positions=True,
        early_layers=("vision_config.deepstack_visual_indexes", "DeepStack"),
        fast_prefill=True,
    )

    def __init__(self, model: torch.nn.Module, pipeline: Any):
        super().__init__(model, pipeline)
        self.vision = QwenVision(self.inner)

    def attach(self) -> None:
        super().attach()
        for modality in self.modalities:
            name = f"get_{modality}_features"
            self.patches.set(self.inner, name, self._wrap_features(getattr(self.inner, name)))
        if self.pipeline.fast:  # the tower's windows (or images) in one attention call per layer
            self.patches.on_restore(varlen_attention.install(self.tower.config))

    def _wrap_features(self, orig: Any) -> Any:
        pixels_name, grid_name = list(inspect.signature(orig).parameters)[:2]  # named per modality

        @functools.wraps(orig)
        def get_features(*args: Any, **kwargs: Any) -> Any:
            kw = bind(orig, args, kwargs)
            pixels, grid_thw = kw.pop(pixels_name), kw.pop(grid_name, None)
            if grid_thw is None:
                return orig(pixels, grid_thw, **kw)
            kw["return_dict"] = True
            return self.vision.features(orig, pixels, grid_thw, self.step(Stage.VISION_ENCODER) is not None, **kw)

        return get_features

    def full_positions(self, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = kw["input_ids"]
        batch, length = ids.shape
        pos = kw.get("position_ids")
        if pos is not None:  # (4, B, L): a text row, then M-RoPE; (3, B, L); or (B, L)
            if pos.dim() == 3:
                return (pos[1:], pos[0]) if pos.shape[0] == 4 else (pos, None)
            return pos.expand(3, batch, -1), None
        names = ("image_grid_thw", "video_grid_thw", "attention_mask", "cache", "second_per_grid_ts", "mm_token_type_ids")
        empty = ids.new_empty((batch, length, 0), dtype=torch.float32)  # the stock rule reads only its shape
        pos3 = compat.compute_3d_position_ids(self.inner, input_ids=ids, inputs_embeds=empty, **{k: kw.get(k) for k in names})
        if pos3 is None:  # the stock text model then numbers the sequence 0..L-1 on all axes
            pos3 = torch.arange(length, device=ids.device).expand(3, batch, length)
        return pos3, None

    def llm_grid(self, kw: dict[str, Any]) -> tuple[int, int] | None:
        pre = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values_videos") is not None or pre.get("video") is not None:
            return None
        if kw.get("image_grid_thw") is not None:
            grids = {tuple(g) for g in kw["image_grid_thw"].tolist()}
        elif pre.get("image") is not None:
            grids = {m.thw if m is not None else None for m in map(meta_of, pre["image"].pooler_output)}
        else:
            return None
        t, h, w = grids.pop() if len(grids) == 1 and None not in grids else (0, 0, 0)
        return (h // self.vision.merge_size, w // self.vision.merge_size) if t == 1 else None

    def reduce_modality(self, modality: str, kw: dict[str, Any], prompt: Prompt) -> tuple[Any, Any, Any] | None:
        out = (kw.get("mm_encoder_outputs") or {}).get(modality)
        if out is not None:
            out = type(out)(**dict(out.items()))  # a copy: never mutate the caller's object
        elif (pixels := kw.get("pixel_values" if modality == "image" else "pixel_values_videos")) is not None:
            getter = getattr(self.inner, f"get_{modality}_features")  # the wrapped getter: tags the features
            out = getter(pixels, kw.get(f"{modality}_grid_thw"), **{k: v for k, v in kw.items() if k not in _FORWARD_ONLY})
        else:
            return None
        items = list(out.pooler_output)
        per_video = modality == "video" and self.pipeline.video_budget == "per_video"
        grid_thw = kw.get(f"{modality}_grid_thw")
        first = None if self.step(Stage.VISION_ENCODER) is None else self.vision.groups(items, modality)
        features, kept, token_mask, keep = self.reduce_items(
            modality, items, prompt, lambda mask: self.vision.units(items, grid_thw, mask, per_video, modality == "video"),
            first, self.vision.merge,
        )
        out.pooler_output = features
        if getattr(out, "deepstack_features", None) and kept is not None:  # Qwen3-VL: they follow the kept tokens
            counts = [len(f) for f in features]
            out.deepstack_features = [  # per layer: one tensor, or a tuple per item
                f[kept] if isinstance(f, torch.Tensor) else tuple(torch.split(torch.cat(list(f))[kept], counts))
                for f in out.deepstack_features
            ]
        return out, token_mask, keep
