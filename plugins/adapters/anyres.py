"""Anyres images (LLaVA-NeXT, LLaVA-OneVision): base image + crop grid + newline tokens.

The stock layout of one image's placeholders (``pack_image_features``): the base image's
``h x w`` tokens, then the unpadded (and for OneVision possibly downscaled) grid of the
crops, row by row, each row followed by one ``image_newline`` token. A single-crop image
(OneVision multi-image prompts) is its base tokens plus one trailing newline.

Budget split (documented behaviour): a step's budget applies per image, to its content
tokens (base + crops; newlines are layout markers, not content). It is split between the
base and the crop grid in proportion to their token counts (``T_base = round(T * N_base /
N)``, at least 1 each, never more than a part holds), and each part is reduced on its own
with its own grid (``context.grid``), so grid methods (pooling) see real 2-D grids. After
reduction a crop row keeps its newline iff it keeps at least one token; the single-crop
image's trailing newline is always kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenreduce.budget import resolve_budget
from tokenreduce.context import ReductionContext
from tokenreduce.pipeline import Step
from tokenreduce.stages import Stage

from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ENCODER_STAGES, slice_info
from .vision import SHALLOW_CLS_KEY

Pack = Callable[[list[torch.Tensor], torch.Tensor | None], list[torch.Tensor]]


@dataclass
class ImageLayout:
    """One image's stock placeholder layout."""

    n_base: int  # content tokens of the base image (all content when there are no crops)
    crop_grid: tuple[int, int] | None  # (rows, cols) of the packed crop grid
    newline: torch.Tensor  # (N_stock,) bool, newline positions
    content_pos: torch.Tensor  # (N_content,) stock position of each content token

    @property
    def n_content(self) -> int:
        return self.content_pos.numel()


def layouts(pack: Pack, num_patches: list[int], tokens_per_crop: int, device) -> list[ImageLayout]:
    """Stock layouts, read off ``pack`` itself: a constant-1 feature with a 0 newline marks the newlines."""
    ones = [torch.ones(n, tokens_per_crop, 1, device=device) for n in num_patches]
    packed = pack(ones, torch.zeros(1, device=device))
    out = []
    for n, p in zip(num_patches, packed):
        newline = p[:, 0] == 0
        content_pos = (~newline).nonzero()[:, 0]
        if n > 1:
            rows = int(newline.sum())
            cols = (content_pos.numel() - tokens_per_crop) // max(rows, 1)
            out.append(ImageLayout(tokens_per_crop, (rows, cols), newline, content_pos))
        else:
            out.append(ImageLayout(content_pos.numel(), None, newline, content_pos))
    return out


def split_budget(total: int, n_base: int, n_crop: int) -> tuple[int, int]:
    """Tokens kept in the base and in the crops for an image budget of ``total`` (< n_base + n_crop)."""
    if n_crop == 0:
        return min(total, n_base), 0
    n = n_base + n_crop
    base = min(n_base, max(1, math.floor(total * n_base / n + 0.5)))
    crop = total - base
    if crop > n_crop:
        crop, base = n_crop, total - n_crop
    if crop == 0 and total >= 2:
        base, crop = base - 1, 1
    return base, crop


def base_grid(n: int) -> tuple[int, int] | None:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def reduce_parts(
    adapter: LlavaFamilyAdapter,
    step: Step,
    tokens: torch.Tensor,
    current: torch.Tensor,
    layout: ImageLayout,
    context: dict,
) -> tuple[torch.Tensor, torch.Tensor, dict, float]:
    """Reduce one image's current tokens ``(n, D)`` (at content indices ``current``) part by part.

    ``context`` tensors are aligned with the current tokens. Returns the kept features
    ``(T, D)``, their positions among the current tokens ``(T,)`` (ascending), per-part
    info and seconds.
    """
    is_base = current < layout.n_base
    n_base, n_crop = int(is_base.sum()), int((~is_base).sum())
    total = resolve_budget(step.reducer.budget, n_base + n_crop, rounding=step.reducer.ratio_rounding)
    if total >= n_base + n_crop:
        return tokens, torch.arange(current.numel(), device=current.device), {"identity": True}, 0.0
    budgets = split_budget(total, n_base, n_crop)
    feats, idx, info, seconds = [], [], {}, 0.0
    for part, sel, budget in (("base", is_base, budgets[0]), ("crops", ~is_base, budgets[1])):
        if budget == 0 or not bool(sel.any()):
            continue
        rows = sel.nonzero()[:, 0]
        full = layout.n_base if part == "base" else layout.n_content - layout.n_base
        grid = None
        if rows.numel() == full:  # an intact part is a real grid
            grid = base_grid(full) if part == "base" else layout.crop_grid
        ctx = ReductionContext(
            stage=step.stage,
            grid=grid,
            text_embeds=context.get("text_embeds"),
            text_mask=context.get("text_mask"),
            cls_token=context.get("cls_token"),
            cls_attention=None if context.get("cls_attention") is None else context["cls_attention"][rows][None],
            keys=None if context.get("keys") is None else context["keys"][rows][None],
            extra={} if context.get(SHALLOW_CLS_KEY) is None else {SHALLOW_CLS_KEY: context[SHALLOW_CLS_KEY][rows][None]},
        )
        red, dt = adapter.run_step(step, tokens[rows][None], None, ctx, budget)
        seconds += dt
        count = int(red.counts[0])
        feats.append(red.tokens[0, :count])
        idx.append(rows[red.indices[0, :count]])
        info[part] = slice_info(red.info, 0, 1)
    # Base tokens precede crop tokens, so the concatenation stays ascending.
    return torch.cat(feats), torch.cat(idx), info, seconds


def assemble(layout: ImageLayout, feats: torch.Tensor, kept: torch.Tensor, newline_embed: torch.Tensor):
    """Kept content features + the newlines of the rows that keep a token, in stock order.

    Returns ``(features (T', D), keep (N_stock,) bool)``.
    """
    n_stock = layout.newline.numel()
    dev = feats.device
    keep = torch.zeros(n_stock, dtype=torch.bool, device=dev)
    keep[layout.content_pos[kept]] = True
    if layout.crop_grid is None:
        keep |= layout.newline  # the single trailing newline stays
    else:
        row = layout.newline.long().cumsum(0) - layout.newline.long()  # newlines before each position
        crop_kept = keep.clone()
        crop_kept[: layout.n_base] = False
        rows_kept = torch.zeros(int(layout.newline.sum()) + 1, dtype=torch.bool, device=dev)
        rows_kept.scatter_(0, row[crop_kept], True)
        keep |= layout.newline & rows_kept[row]
    buf = torch.zeros(n_stock, feats.shape[-1], dtype=feats.dtype, device=dev)
    buf[layout.content_pos[kept]] = feats
    buf[layout.newline] = newline_embed.to(feats.dtype)
    return buf[keep], keep


def encode_anyres_images(
    adapter: LlavaFamilyAdapter,
    selected: torch.Tensor,
    num_patches: list[int],
    pack: Pack,
    *,
    vctx=None,
    modality: str = "image",
) -> Encoded:
    """Reduce anyres images given the tower's selected features ``(P, N, D_v)`` of all their crops.

    ``pack(list of (P_i, N, D) per image, newline or None) -> list of (N_i, D)`` is the
    model's own ``pack_image_features`` with the image sizes bound.
    """
    inner = adapter.inner
    dev = selected.device
    per_crop = selected.shape[1]
    lay = layouts(pack, num_patches, per_crop, dev)
    text, text_mask = adapter.text_context(modality, [layout.newline.numel() for layout in lay])
    projected = inner.multi_modal_projector(selected)  # the stock arrangement: bit-identical to the model
    content_p = pack(list(torch.split(projected, num_patches)), None)
    step_v, step_p = (adapter.step(st) for st in ENCODER_STAGES)
    content_v = pack(list(torch.split(selected, num_patches)), None) if step_v is not None else None
    packed_ctx: dict[str, list] = {}
    if vctx is not None:
        for key, att in (("cls_attention", vctx.cls_attention), (SHALLOW_CLS_KEY, vctx.shallow_cls_attention)):
            if att is not None:
                packed_ctx[key] = [a[:, 0] for a in pack(list(torch.split(att.unsqueeze(-1), num_patches)), None)]
        packed_ctx["keys"] = pack(list(torch.split(vctx.keys, num_patches)), None)
        if vctx.cls_token is not None:
            starts = torch.tensor([0] + num_patches[:-1], device=dev).cumsum(0)
            packed_ctx["cls_token"] = vctx.cls_token[starts]  # the base crop's CLS
    newline = inner.image_newline
    records = {st: ([], [], [], [], 0.0) for st in ENCODER_STAGES}
    keeps, pooler = [], []
    for i, layout in enumerate(lay):  # per image: each has its own layout and budget split
        ctx = {k: v[i] for k, v in packed_ctx.items()}
        if text is not None:
            ctx["text_embeds"], ctx["text_mask"] = text[i : i + 1], text_mask[i : i + 1]
        feats, current = content_p[i], torch.arange(layout.n_content, device=dev)
        for stage, step in zip(ENCODER_STAGES, (step_v, step_p)):
            if step is None:
                continue
            src = content_v[i] if stage is Stage.VISION_ENCODER else feats
            red_feats, pos, info, seconds = reduce_parts(adapter, step, src, current, layout, ctx)
            if stage is Stage.PROJECTOR:
                feats = red_feats
            elif not info.get("identity"):  # otherwise keep the stock projected features
                feats = inner.multi_modal_projector(red_feats)
            before, after, indices, infos, secs = records[stage]
            before.append(current.numel())
            current = current[pos]
            after.append(current.numel())
            indices.append(current)
            infos.append(info)
            records[stage] = (before, after, indices, infos, secs + seconds)
            ctx = {k: (v[pos] if k in ("cls_attention", SHALLOW_CLS_KEY, "keys") else v) for k, v in ctx.items()}
        out, keep = assemble(layout, feats, current, newline)
        pooler.append(out)
        keeps.append(keep)
    for stage, step in zip(ENCODER_STAGES, (step_v, step_p)):
        if step is not None:
            adapter.add_record(step, *records[stage])
    return Encoded(keep=keeps, pooler=pooler)
