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

from tokenreduce.adapter import StageRecord
from tokenreduce.budget import resolve_budget
from tokenreduce.pipeline import Step
from tokenreduce.stages import Stage
from tokenreduce.sync import device_list

from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ContextSource, Units
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
    model's own ``pack_image_features`` with the image sizes bound. The engine's units are
    the images' parts (base, crop grid); each step's budget is split per image (:func:`split_budget`).
    """
    dev = selected.device
    lay = layouts(pack, num_patches, selected.shape[1], dev)
    text, text_mask = adapter.text_context(modality, [layout.newline.numel() for layout in lay])
    # The stock arrangement: projected, then packed (bit-identical to the model), content only.
    content_p = torch.cat(pack(list(torch.split(adapter.projector(selected), num_patches)), None))
    parts = [(i, n, grid) for i, layout in enumerate(lay) for n, grid in (
        (layout.n_base, base_grid(layout.n_base) if layout.crop_grid is not None else base_grid(layout.n_content)),
        (layout.n_content - layout.n_base, layout.crop_grid)) if n > 0]
    item_ids = [i for i, _, _ in parts]
    item = device_list(item_ids, dev)
    units = Units([n for _, n, _ in parts], [g for _, _, g in parts], item, item, budgets=[None] * len(parts),
                  item_ids=item_ids)
    source = ContextSource(per_item={"text_embeds": text, "text_mask": text_mask} if text is not None else {})
    if vctx is not None:  # per content token, in packed order (base, then crops), like the features
        for key, att in (("cls_attention", vctx.cls_attention), (f"extra.{SHALLOW_CLS_KEY}", vctx.shallow_cls_attention)):
            if att is not None:
                source.per_token[key] = torch.cat(pack(list(torch.split(att.unsqueeze(-1), num_patches)), None))[:, 0]
        source.per_token["keys"] = torch.cat(pack(list(torch.split(vctx.keys, num_patches)), None))
        if vctx.cls_token is not None:  # the base crop's CLS
            source.per_item["cls_token"] = vctx.cls_token[torch.tensor([0] + num_patches[:-1], device=dev).cumsum(0)]

    of_image = [[u for u, (i, _, _) in enumerate(parts) if i == k] for k in range(len(lay))]  # its parts' units
    start = torch.tensor([0] + [layout.n_content for layout in lay], device=dev).cumsum(0)[:-1]

    def plan(step: Step, units: Units) -> Units:
        """Each image's budget over its content, split between its parts (each keeps all: no reduction)."""
        budgets: list = [None] * units.count
        for own in of_image:
            lens = [units.lens[u] for u in own]
            total = resolve_budget(step.reducer.budget, sum(lens), rounding=step.reducer.ratio_rounding)
            split = lens if total >= sum(lens) else split_budget(total, lens[0], lens[1] if len(lens) > 1 else 0)
            for u, b in zip(own, split):
                budgets[u] = b
        return Units(units.lens, units.grids, units.item, units.row, units.frames, budgets, units.item_ids)

    def per_image(units: Units, original: torch.Tensor) -> list[torch.Tensor]:
        """Each image's kept tokens as indices into its content, in output order."""
        local = original - start[units.item.repeat_interleave(units.lengths(dev))]
        return list(torch.split(local, [sum(units.lens[u] for u in own) for own in of_image]))

    def recorder(step: Step, res, original: torch.Tensor) -> None:
        """One entry per image (its parts together; info per part, or identity)."""
        info = [{"identity": True} if all(res.info[u].get("identity") for u in own)
                else {name: res.info[u] for name, u in zip(("base", "crops"), own)} for own in of_image]
        before = [sum(res.lens_in[u] for u in own) for own in of_image]
        indices = per_image(res.units, original)
        after = [len(x) for x in indices]
        adapter.records.append(StageRecord(step.stage, step.reducer.name, None, before, after, indices, info, res.seconds))

    vision = None
    if adapter.step(Stage.VISION_ENCODER) is not None:
        vision = torch.cat(pack(list(torch.split(selected, num_patches)), None))

    def project(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
        return adapter.projector(x) if reduced else content_p

    feats, units, kept = adapter.reduce_units(vision if vision is not None else content_p, units, source, project,
                                              plan=plan, recorder=recorder)
    if kept is None:
        kept = torch.arange(content_p.shape[0], device=dev)
    keeps, pooler = [], []
    for layout, idx, f in zip(lay, per_image(units, kept), torch.split(feats, [sum(units.lens[u] for u in own) for own in of_image])):
        out, keep = assemble(layout, f, idx, adapter.inner.image_newline)
        pooler.append(out)
        keeps.append(keep)
    return Encoded(keep=keeps, pooler=pooler, kept=[out.shape[0] for out in pooler])
