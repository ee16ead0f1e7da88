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

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.errors import ConfigError

from .patches import patched
from .units import Units

META = "_tokenreduce_meta"


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

    def merger_bypassed(self) -> Any:
        """Make the tower return the merger's input, grouped ``(groups, 4 * D_v)``."""
        width = self.visual.merger.hidden_size
        return patched(self.visual.merger, "forward", lambda x: x.reshape(-1, width))

    def merge(self, groups: torch.Tensor) -> torch.Tensor:
        """The stock merger applied to ``(G, 4 * D_v)`` groups: ``(G, D)``."""
        merger = self.visual.merger
        return merger(groups.reshape(-1, merger.hidden_size // self.merge_size**2))

    def groups(self, items: list[torch.Tensor], modality: str) -> torch.Tensor:
        """``(G, 4 * D_v)`` the merge groups of every item (what ``vision_encoder`` steps reduce)."""
        metas = [meta_of(t) for t in items]
        if any(m is None or m.groups is None for m in metas):
            raise ConfigError(
                f"the vision_encoder stage needs the merger's input, but the {modality} features were "
                "encoded outside the patched model (precomputed mm_encoder_outputs); pass pixel values "
                "or reduce at the projector stage only"
            )
        return torch.cat([m.groups for m in metas], dim=0)  # type: ignore[union-attr]

    def features(self, getter: Any, pixels: torch.Tensor, grid_thw: torch.Tensor, groups: bool, **kwargs: Any) -> Any:
        """Run the stock feature getter; tag each per-image tensor with its grid (and, with ``groups``,
        its merge groups: the tower then runs with the merger bypassed, which is applied here)."""
        with self.merger_bypassed() if groups else contextlib.nullcontext():
            out = getter(pixels, grid_thw, **kwargs)
        items = list(out.pooler_output)
        if groups:
            out.pooler_output = torch.split(self.merge(torch.cat(items)), [len(g) for g in items])
        for tensor, item, g in zip(out.pooler_output, items, grid_thw.tolist()):
            setattr(tensor, META, FeatureMeta(tuple(int(v) for v in g), item if groups else None))
        return out

    def units(self, items: list[torch.Tensor], grid_thw: torch.Tensor | None, token_mask: torch.Tensor,
              per_video: bool, video: bool = False) -> Units:
        """The reduction units of one modality's per-item features (see :meth:`.Units.from_grids`):
        each item's merged-token grid from its metadata, else from ``grid_thw``."""
        known = grid_thw.tolist() if grid_thw is not None and len(grid_thw) == len(items) else None
        m = self.merge_size
        thws = [meta.thw if (meta := meta_of(x)) is not None else (tuple(known[i]) if known else None) for i, x in enumerate(items)]
        grids = [None if g is None else (int(g[0]), int(g[1]) // m, int(g[2]) // m) for g in thws]
        return Units.from_grids([(x.shape[0], g) for x, g in zip(items, grids)], per_video, video, token_mask.nonzero()[:, 0])
