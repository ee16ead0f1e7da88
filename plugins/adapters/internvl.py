"""Adapter for InternVL (``InternVLForConditionalGeneration``: InternViT tiles, pixel shuffle + MLP, Qwen2)."""

from __future__ import annotations

import math

import torch

from tokenreduce.errors import ConfigError, InvalidInputError

from .engine import Family
from .llava_base import Encoded, LlavaFamilyAdapter
from .units import ENCODER_STAGES
from .units import Units, keep_mask
from .vision import VisionContext, selected_layer, shallow_cls_layer


class InternVLAdapter(LlavaFamilyAdapter):
    """InternVL: the processor cuts an image into 448-px tiles (plus a thumbnail), InternViT
    encodes each tile alone, the pixel shuffle folds every 2x2 patch group into one token
    (``4 * D_v`` wide; 256 tokens per tile at ``downsample_ratio`` 0.5) and an MLP projects it.
    The image's placeholders are one run: its tiles' tokens, tile after tile, each tile in
    raster order.

    Unit: an image = a maximal run of placeholders (the processor wraps each image in
    ``<img>...</img>``). A step's budget applies per image, over the tokens of all its tiles
    together (one selection; ``context.grid`` = the tiles stacked vertically, ``(k*s, s)``,
    while intact): the inputs say neither the tile layout nor whether a thumbnail is present,
    so no split like LLaVA-NeXT's base/crops is derived. ``vision_encoder`` steps see the
    shuffled tokens before the MLP, ``projector`` steps its output. Videos: transformers feeds
    frames as one-tile images, each frame its own run, so every frame is a unit;
    ``video_budget: per_video`` is refused (the model cannot tell frames from images).

    Context: per tile, the selected layer's [CLS] attention row and head-averaged keys,
    recomputed from its q/k (with InternViT's q/k norms), then pixel-shuffled like the
    features: a token's ``cls_attention`` is the sum over its 2x2 patches, its ``keys`` their
    four keys concatenated. ``cls_token``: the last tile's [CLS] (the thumbnail, or the only tile).
    """

    family = Family("internvl", ("InternVLForConditionalGeneration",), cls=True, fast_prefill=True)

    def validate(self) -> None:
        if self.pipeline.video_budget == "per_video":
            raise ConfigError("video_budget=per_video: InternVL takes video frames as one-tile images; use per_frame")
        super().validate()

    def llm_grid(self):
        vc = self.model.config.vision_config
        side = int(vc.image_size[0] // vc.patch_size[0] * self.model.config.downsample_ratio)
        return side, side

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch ``(P, N, C)`` -> per-token ``(P, N / 4, 4C)``, grouped as the stock ``pixel_shuffle``."""
        side = math.isqrt(x.shape[1])
        y = self.inner.pixel_shuffle(x.reshape(x.shape[0], side, side, -1), scale_factor=self.model.config.downsample_ratio)
        return y.reshape(x.shape[0], -1, y.shape[-1])

    def run_tower(self, pixels: torch.Tensor, layer: int, start: int) -> tuple[torch.Tensor, VisionContext | None]:
        """The selected features (as the stock getter selects them) and, if a step needs it, their context.
        Hidden states only where the stock getter asks for them (transformers then installs capture hooks
        for good); the blocks whose [CLS] rows are recomputed give their inputs to pre-hooks removed at once."""
        blocks = self.inner.vision_tower.encoder.layer
        si = shallow_cls_layer(map(self.step, ENCODER_STAGES), len(blocks))
        li = selected_layer(layer, len(blocks)) if self.needs("cls_token", "cls_attention", "keys") else None
        seen: dict[int, torch.Tensor] = {}
        hooks = [blocks[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i in {li, si} - {None}]
        # With those hooks the tower must run, not be replayed (a replay runs no hook): the fast path's
        # graphed tower keeps the stock forward as ``stock``.
        tower = getattr(self.tower.forward, "stock", self.tower) if hooks else self.tower
        try:
            out = tower(pixel_values=pixels.to(self.inner.dtype), output_hidden_states=layer != -1, return_dict=True)
        finally:
            for h in hooks:
                h.remove()
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]

        def row_and_keys(i: int):  # the block's [CLS] query row and head-averaged keys, with InternViT's q/k norms
            att = blocks[i].attention
            x = blocks[i].layernorm_before(seen[i])
            k = att.k_norm(att.k_proj(x)).view(*x.shape[:2], -1, att.head_dim).transpose(1, 2)
            q = att.q_norm(att.q_proj(x[:, :1])).view(x.shape[0], 1, -1, att.head_dim).transpose(1, 2)
            row = (torch.matmul(q.float(), k.float().transpose(2, 3)) * att.scale).softmax(-1).mean(1)[:, 0, start:]
            return self.shuffle(row.to(x.dtype).unsqueeze(-1)).sum(-1), self.shuffle(k.mean(1)[:, start:])

        if li is None:
            return feats, None
        shallow = row_and_keys(si)[0] if si is not None else None
        return feats, VisionContext(feats[:, 0], *row_and_keys(li), shallow)

    def tiles_per_image(self, ids: torch.Tensor, per_tile: int, n_tiles: int) -> list[int]:
        ph = ids == self.token_id("image")
        starts = ph & ~torch.nn.functional.pad(ph[:, :-1], (1, 0))
        lengths = torch.bincount(starts.flatten().long().cumsum(0)[ph.flatten()] - 1).tolist()
        if any(n % per_tile for n in lengths) or sum(lengths) != per_tile * n_tiles:
            raise InvalidInputError(f"input_ids hold image placeholder runs of {lengths} tokens but pixel_values has "
                                    f"{n_tiles} tiles of {per_tile} tokens; an image's run must hold {per_tile} per tile")
        return [n // per_tile for n in lengths]

    def encode(self, kw: dict) -> dict[str, Encoded]:
        inner = self.inner
        layer, _, start = self.feature_selection(kw)
        if not isinstance(layer, int):
            raise InvalidInputError(f"vision_feature_layer={layer!r}: InternVL selects a single layer (an int)")
        feats, vctx = self.run_tower(kw["pixel_values"], layer, start)
        shuffled = self.shuffle(feats[:, start:])
        projected = inner.multi_modal_projector(shuffled)  # the stock arrangement: bit-identical to the model
        per_tile, side = shuffled.shape[1], math.isqrt(shuffled.shape[1])
        tiles = self.tiles_per_image(kw["input_ids"], per_tile, shuffled.shape[0])
        lens = [k * per_tile for k in tiles]
        text, text_mask = self.text_context("image", lens)
        if vctx is not None:  # an image's [CLS]: its last tile's (the thumbnail, or the only tile)
            vctx.cls_token = vctx.cls_token[torch.tensor(tiles, device=shuffled.device).cumsum(0) - 1]
        item = torch.arange(len(tiles), device=shuffled.device)
        # An image is one unit: its tiles one after another (the tower's order), their grids stacked.
        units = Units(lens, [(k * side, side) for k in tiles], item, item, item_ids=list(range(len(tiles))))

        def project(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            # The stock projected features while nothing was removed: bit-identical to the model.
            return inner.multi_modal_projector(x) if reduced else projected.flatten(0, 1)

        flat, units, original = self.reduce_units(shuffled.flatten(0, 1), units, self.unit_context(vctx, text, text_mask), project)
        keep = keep_mask(original, sum(lens), flat.device)
        # One tensor, as the stock getter returns it: the forward scatters it over the placeholders in order.
        return {"image": Encoded(keep=list(torch.split(keep, lens)), pooler=flat[None], kept=list(units.lens))}
