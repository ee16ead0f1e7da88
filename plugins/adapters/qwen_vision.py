"""The vision side of Qwen-VL models as the adapter sees it: features per image, merge groups, units.

While a pipeline has a ``vision_encoder`` step, ``get_image_features`` /
``get_video_features`` run the tower with the patch merger bypassed, which yields the
merger's input grouped ``(groups, 4 * D_v)`` in natural raster order (the stock forward
undoes Qwen2.5-VL's window reordering on whatever the merger returns), then apply the
stock merger themselves. Each per-image output tensor carries a small metadata record
(its ``(t, h, w)`` patch grid and, when needed, its merge groups) so that the reduction
can run later, in the forward call, also when ``generate()`` encoded the images
beforehand (transformers 5.x pre-encodes images into ``mm_encoder_outputs``, drops
``pixel_values`` / ``image_grid_thw`` and may repeat images for beam search).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .units import Units

META = "_tokenreduce_meta"
_MISSING = object()


@dataclass
class FeatureMeta:
    """Attached to each per-image feature tensor the patched feature getters return."""

    thw: tuple[int, int, int]
    groups: torch.Tensor | None = None  # (n, 4 * D_v) merger input, when a vision_encoder step runs


def meta_of(tensor: torch.Tensor) -> FeatureMeta | None:
    return getattr(tensor, META, None)


class QwenVision:
    """Feature extraction and unit layout for one Qwen-VL model (``Qwen2VLModel`` / ``Qwen2_5_VLModel``)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.visual = inner.visual
        self.merge_size = int(self.visual.spatial_merge_size)

    @contextmanager
    def merger_bypassed(self) -> Iterator[None]:
        """Make the tower return the merger's input, grouped ``(groups, 4 * D_v)``."""
        merger = self.visual.merger
        width = merger.hidden_size
        saved = merger.__dict__.get("forward", _MISSING)
        merger.forward = lambda x: x.reshape(-1, width)
        try:
            yield
        finally:
            if saved is _MISSING:
                merger.__dict__.pop("forward", None)
            else:
                merger.forward = saved

    def merge(self, groups: torch.Tensor) -> torch.Tensor:
        """The stock merger applied to ``(G, 4 * D_v)`` groups: ``(G, D)``."""
        merger = self.visual.merger
        return merger(groups.reshape(-1, merger.hidden_size // self.merge_size**2))

    def features(self, getter: Any, pixels: torch.Tensor, grid_thw: torch.Tensor, groups: bool, **kwargs: Any) -> Any:
        """Run the stock feature getter; tag each per-image tensor with its grid (and merge groups)."""
        if not groups:
            out = getter(pixels, grid_thw, **kwargs)
            pooled = list(out.pooler_output)
            thw = grid_thw.tolist()
            for tensor, g in zip(pooled, thw):
                setattr(tensor, META, FeatureMeta(tuple(int(v) for v in g)))
            return out
        with self.merger_bypassed():
            out = getter(pixels, grid_thw, **kwargs)
        grouped = list(out.pooler_output)
        merged = torch.split(self.merge(torch.cat(grouped)), [len(g) for g in grouped])
        for tensor, group, g in zip(merged, grouped, grid_thw.tolist()):
            setattr(tensor, META, FeatureMeta(tuple(int(v) for v in g), group))
        out.pooler_output = merged
        return out

    def units(
        self,
        items: list[torch.Tensor],
        grid_thw: torch.Tensor | None,
        token_mask: torch.Tensor,
        per_video: bool,
        video: bool = False,
    ) -> Units:
        """The reduction units of one modality's per-item features.

        An item with a known ``(t, h, w)`` grid (from its metadata or ``grid_thw``) gives
        ``t`` frame units of ``(h/2, w/2)`` tokens, or one ``(t*h/2, w/2)`` unit when
        ``per_video``; an item of unknown grid is one unit without a grid. ``video``: the
        items are videos (a ``per_video`` unit then carries its frame layout).
        """
        m = self.merge_size
        known = grid_thw.tolist() if grid_thw is not None and len(grid_thw) == len(items) else None
        lens: list[int] = []
        grids: list[tuple[int, int] | None] = []
        item_of: list[int] = []
        frames: list[tuple[int, int] | None] = []
        for i, tensor in enumerate(items):  # grid metadata: a few ints per image
            meta = meta_of(tensor)
            thw = meta.thw if meta is not None else (tuple(int(v) for v in known[i]) if known else None)
            n = tensor.shape[0]
            if thw is None or thw[0] * (thw[1] // m) * (thw[2] // m) != n:
                lens.append(n)
                grids.append(None)
                item_of.append(i)
                frames.append(None)
                continue
            t, h, w = thw[0], thw[1] // m, thw[2] // m
            if per_video or t == 1:
                lens.append(n)
                grids.append((t * h, w))
                item_of.append(i)
                frames.append((t, h * w) if per_video and video else None)
            else:
                lens += [h * w] * t
                grids += [(h, w)] * t
                item_of += [i] * t
                frames += [None] * t
        device = token_mask.device
        lengths = torch.tensor(lens, dtype=torch.long, device=device)
        rows_of_tokens = token_mask.nonzero()[:, 0]
        rows = rows_of_tokens[torch.cumsum(lengths, 0) - lengths]
        return Units(lens, grids, torch.tensor(item_of, dtype=torch.long, device=device), rows, frames)
