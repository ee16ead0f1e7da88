"""Encoder-side reduction for the Qwen-VL adapter: the ``vision_encoder`` and ``projector`` steps of one modality.

For one prefill and one modality (images or videos): get the per-item features (from
pixels through the wrapped feature getters, or precomputed ``mm_encoder_outputs``), lay
them out as units, run the ``vision_encoder`` step on the merge groups, the stock merger
on what it kept, the ``projector`` step on the merged tokens, and return the reduced
encoder output plus which placeholder tokens survive. Records go to the adapter's list.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenreduce import Stage, StageRecord
from tokenreduce.errors import ConfigError, InvalidInputError
from tokenreduce.pipeline import Pipeline

from .qwen_vision import QwenVision, meta_of
from .units import ENCODER_STAGES, ContextSource, Units, call_reducer, encoder_steps, keep_mask, record

MODALITIES = ("image", "video")
# Context the encoder-side stages give reducers.
PROVIDED = frozenset({"grid", "positions", "text_embeds", "text_mask"})
# ... and for whole videos (``video_budget: per_video``): their frame layout.
PROVIDED_PER_VIDEO = PROVIDED | {"frames", "frame_index"}


class Prompt:
    """The unreduced prompt of one prefill: ids, mask, original 3-D positions, lazy text embeddings."""

    def __init__(self, inner: Any, ids: torch.Tensor, mask: torch.Tensor | None, pos3: torch.Tensor):
        self.inner = inner
        self.ids = ids
        self.mask = mask
        self.pos3 = pos3
        self._embeds: torch.Tensor | None = None

    def token_positions(self, token_mask: torch.Tensor) -> torch.Tensor:
        """``(S, 3)`` original positions of the placeholder tokens, in flat (row-major) order."""
        return self.pos3[:, token_mask].transpose(0, 1)

    @property
    def embeds(self) -> torch.Tensor:
        if self._embeds is None:
            self._embeds = self.inner.get_input_embeddings()(self.ids)
        return self._embeds

    @property
    def text_mask(self) -> torch.Tensor:
        cfg = self.inner.config
        text = (self.ids != cfg.image_token_id) & (self.ids != cfg.video_token_id)
        return text if self.mask is None else text & self.mask.bool()


class EncoderSide:
    """The encoder-side steps of a pipeline on one Qwen-VL model (``Qwen*VLModel``)."""

    def __init__(self, inner: Any, pipeline: Pipeline, records: list[StageRecord]):
        self.inner = inner
        self.pipeline = pipeline
        self.records = records
        self.vision = QwenVision(inner)

    def _features(self, modality: str, kw: dict[str, Any]) -> Any:
        """This modality's encoder output (per-item features), or ``None`` if the call has none."""
        pre = (kw.get("mm_encoder_outputs") or {}).get(modality)
        if pre is not None:
            return type(pre)(**dict(pre.items()))  # a copy: never mutate the caller's object
        pixels = kw.get("pixel_values" if modality == "image" else "pixel_values_videos")
        if pixels is None:
            return None
        extra = {k: v for k, v in kw.items() if k not in _FORWARD_ARGS}
        getter = getattr(self.inner, f"get_{modality}_features")  # the wrapped getter: tags the features
        return getter(pixels, kw.get(f"{modality}_grid_thw"), **extra)

    def reduce(
        self, modality: str, kw: dict[str, Any], prompt: Prompt
    ) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
        """Encode and reduce one modality; returns (encoder output, placeholder mask, kept placeholders)."""
        out = self._features(modality, kw)
        if out is None:
            return None
        cfg = self.inner.config
        token_mask = prompt.ids == (cfg.image_token_id if modality == "image" else cfg.video_token_id)
        items = list(out.pooler_output)
        flat = torch.cat(items, dim=0)
        total = int(token_mask.sum())
        if total != flat.shape[0]:
            raise InvalidInputError(
                f"{modality} placeholder tokens and features do not match: {total} placeholder tokens in "
                f"input_ids, {flat.shape[0]} {modality} features"
            )
        per_video = modality == "video" and self.pipeline.video_budget == "per_video"
        units = self.vision.units(items, kw.get(f"{modality}_grid_thw"), token_mask, per_video, modality == "video")
        steps = {stage: next(iter(self.pipeline.at(stage)), None) for stage in ENCODER_STAGES}
        first = flat
        if steps[Stage.VISION_ENCODER] is not None:
            metas = [meta_of(t) for t in items]
            if any(m is None or m.groups is None for m in metas):
                raise ConfigError(
                    f"the vision_encoder stage needs the merger's input, but the {modality} features were "
                    "encoded outside the patched model (precomputed mm_encoder_outputs); pass pixel values "
                    "or reduce at the projector stage only"
                )
            first = torch.cat([m.groups for m in metas], dim=0)  # type: ignore[union-attr]

        def project(tokens: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            # The merger's stock output while no group was removed (the getter merged them all).
            return self.vision.merge(tokens) if reduced else flat

        need = set().union(*(s.reducer.required_context for s in steps.values() if s is not None))
        context = ContextSource(
            per_token={"positions": prompt.token_positions(token_mask)},
            per_row={"text_embeds": prompt.embeds, "text_mask": prompt.text_mask} if need & {"text_embeds", "text_mask"} else {},
            extra=lambda ids: {"modality": modality, "rows": units.row[ids], "items": units.item[ids]},
        )
        recorder = record(self.records, units.offsets(flat.device), lambda item: {"modality": modality, "item": item})
        flat, units, source = encoder_steps(steps, call_reducer, first, units, project, context, recorder)

        keep_tokens = keep_mask(source, total, flat.device)
        per_item = torch.zeros(len(items), dtype=torch.long, device=flat.device)
        per_item.index_add_(0, units.item, units.lengths(flat.device))
        counts = per_item.tolist()
        out.pooler_output = tuple(torch.split(flat, counts))
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack and source is not None:  # Qwen3-VL: the features added to early decoder layers follow the kept tokens
            # Per layer: a tensor of all tokens (older releases) or a tuple per item (newer).
            out.deepstack_features = [
                f[source] if isinstance(f, torch.Tensor) else tuple(torch.split(torch.cat(list(f))[source], counts))
                for f in deepstack
            ]
        return out, token_mask, keep_tokens


# Arguments of the stock forward that are not passed on to the feature getters.
_FORWARD_ARGS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "position_ids",
        "cache",
        "inputs_embeds",
        "labels",
        "use_cache",
        "pixel_values",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
        "mm_token_type_ids",
        "second_per_grid_ts",
        "logits_to_keep",
        "mm_encoder_outputs",
        "return_dict",
    }
)
