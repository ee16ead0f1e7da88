"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP tower, MLP projector, Llama)."""

from __future__ import annotations

import torch

from tokenreduce.context import ReductionContext
from tokenreduce.errors import InvalidInputError
from tokenreduce.ops import gather_rows, keep_mask_from
from tokenreduce.stages import Stage

from .llava_base import ENCODER_STAGES, Encoded, LlavaFamilyAdapter, per_row
from .vision import SHALLOW_CLS_KEY, vision_context


def select_features(hidden_states, feature_layer, start: int) -> torch.Tensor:
    """The model's image features: ``hidden_states[feature_layer]`` (concatenated if a list), from ``start``."""
    if isinstance(feature_layer, int):
        feats = hidden_states[feature_layer]
    else:
        feats = torch.cat([hidden_states[i] for i in feature_layer], dim=-1)
    return feats[:, start:]


def encoder_context(stage: Stage, vctx, idx: torch.Tensor, text, text_mask, grid) -> ReductionContext:
    """Context of an encoder-side step for rows whose tokens sit at patch indices ``idx (U, N)``."""
    shallow = None if vctx is None else vctx.shallow_cls_attention
    return ReductionContext(
        stage=stage,
        cls_token=None if vctx is None else vctx.cls_token,
        cls_attention=None if vctx is None or vctx.cls_attention is None else gather_rows(vctx.cls_attention.unsqueeze(-1), idx).squeeze(-1),
        keys=None if vctx is None else gather_rows(vctx.keys, idx),
        text_embeds=text,
        text_mask=text_mask,
        grid=grid,
        extra={} if shallow is None else {SHALLOW_CLS_KEY: gather_rows(shallow.unsqueeze(-1), idx).squeeze(-1)},
    )


class LlavaAdapter(LlavaFamilyAdapter):
    """LLaVA-1.5: each image is one row of ``h x w`` patch tokens (CLS dropped by the
    ``default`` strategy); ``vision_encoder`` steps reduce them in the vision width before
    the projector, ``projector`` steps in the LLM width after it. Context: the selected
    vision layer's CLS token, CLS attention row and head-averaged keys (recomputed from
    that layer's q/k for the CLS row only), the patch grid while it is intact, and the
    instruction's embeddings.
    """

    name = "llava"
    fast_prefill = True
    model_classes = ("LlavaForConditionalGeneration",)

    def patch_grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def llm_grid(self):
        return self.patch_grid()

    def encode(self, kw: dict) -> dict[str, Encoded]:
        inner = self.inner
        if kw.get("image_sizes") is not None:
            raise InvalidInputError("image_sizes (pixtral-style vision towers) is not supported by the llava adapter")
        layer, _, start = self.feature_selection(kw)
        out = inner.vision_tower(kw["pixel_values"], output_hidden_states=True, return_dict=True)
        tokens = select_features(out.hidden_states, layer, start)
        n, total = tokens.shape[:2]
        h, w = self.patch_grid()
        grid = (h, w) if h * w == total else None
        vctx = None
        if self.needs("cls_token", "cls_attention", "keys"):
            vctx = vision_context(inner.vision_tower, out.hidden_states, layer, start, map(self.step, ENCODER_STAGES))
        text, text_mask = self.text_context("image", [total] * n)
        idx = torch.arange(total, device=tokens.device).expand(n, total)
        valid = torch.ones(n, total, dtype=torch.bool, device=tokens.device)
        for stage in ENCODER_STAGES:
            if stage is Stage.PROJECTOR:
                tokens = inner.multi_modal_projector(tokens)
            step = self.step(stage)
            if step is None:
                continue
            ctx = encoder_context(stage, vctx, idx, text, text_mask, grid)
            # Every image has the same token count and every reducer keeps the same count of
            # equal rows, so rows never hold padding here: no mask, which lets reducers
            # skip reading one back from the GPU.
            red, seconds = self.run_step(step, tokens, None, ctx)
            before = valid.sum(dim=1).tolist()
            counts, _, info = per_row(red)
            if red.info.get("identity"):
                # Keep the very tensor the stock model would use: in bf16 a copy can take
                # another matmul path in the projector and round differently.
                self.add_record(step, before, counts, [idx[i, : counts[i]] for i in range(n)], info, seconds)
                continue
            idx = gather_rows(idx.unsqueeze(-1), red.indices).squeeze(-1).masked_fill(~red.valid, -1)
            self.add_record(step, before, counts, [idx[i, : counts[i]] for i in range(n)], info, seconds)
            tokens, valid = red.tokens, red.valid
            grid = None
        counts = valid.sum(dim=1).tolist()
        features = [tokens[i, : counts[i]] for i in range(n)]
        keep = keep_mask_from(idx, valid, total)
        return {"image": Encoded(keep=list(keep), pooler=features)}
