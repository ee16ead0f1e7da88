"""``pool``: 2-D average pooling of the patch grid to exactly the budget."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tokenreduce import Reducer, ReducerParams, Stage, make_reduction, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale, unscale


class PoolParams(ReducerParams):
    aspect: float | None = Field(
        default=None, gt=0, description="Pooled grid aspect (width/height); default: the token grid's."
    )


def _bands(h: int, w: int, t: int, aspect: float | None) -> int:
    """Number of horizontal bands so that every band holds at most ``w`` cells."""
    ratio = aspect if aspect is not None else w / h
    hp = min(h, max(1, round(math.sqrt(t / ratio))))
    while math.ceil(t / hp) > w:  # ends at hp = h at the latest, since t <= h * w
        hp += 1
    return hp


class PoolReducer(Reducer):
    """Average-pool the token grid into exactly T cells (2-D, near-uniform rectangles).

    The valid tokens of a row, in order, form an ``h x w`` grid: ``context.grid`` if
    given, else a square (``n`` must be a perfect square). The grid is cut into ``hp``
    horizontal bands (``hp`` chosen so that cells are close to square); band ``i`` is
    cut into ``T // hp`` or ``T // hp + 1`` cells along the width, so the cell count is
    exactly ``T`` for any ``T`` (a perfect-square ``T`` on a square grid gives the
    usual ``sqrt(T) x sqrt(T)`` pooling). Each cell's feature is the mean of its tokens;
    its index is its first (top-left) token; ``sizes`` holds the cell sizes.
    """

    name = "pool"
    stages = frozenset(Stage)
    Params = PoolParams
    # Without a mask the grid geometry comes from host-known sizes: no device read.
    graph_safe = True
    paper = "2-D average pooling (baseline), as in LLaVA-OneVision's video pooling."

    def _grid(self, n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is not None:
            h, w = grid
            if h * w != n:
                raise InvalidInputError(f"context.grid={grid} has {h * w} cells but a row has {n} valid tokens")
            return h, w
        side = math.isqrt(n)
        if side * side != n:
            raise InvalidInputError(
                f"pool needs a square grid of valid tokens or context.grid=(h, w); got {n} tokens"
            )
        return side, side

    def reduce(self, tokens, counts, valid, context):
        b, n, _ = tokens.shape
        if context.uniform_count is not None:
            # Every row holds n tokens and keeps the same count: one geometry, known here.
            t_max = context.uniform_count
            h, w = self._grid(n, context.grid)
            h_, w_, hp_ = h, w, _bands(h, w, t_max, self.params.aspect)  # host ints: the same arithmetic
        else:
            n_valid = valid.sum(dim=1)
            # Grid geometry per distinct (n, T) pair, computed on host: a handful of scalars.
            pairs = {(nv, t) for nv, t in zip(n_valid.tolist(), counts.tolist())}
            geo = {}
            for nv, t in pairs:
                if nv == 0:
                    geo[(nv, t)] = (1, 1, 1)
                    continue
                h, w = self._grid(nv, context.grid)
                geo[(nv, t)] = (h, w, _bands(h, w, t, self.params.aspect))
            rows = [geo[(nv, t)] for nv, t in zip(n_valid.tolist(), counts.tolist())]
            h_, w_, hp_ = (torch.tensor(c, device=tokens.device)[:, None] for c in zip(*rows))
            t_max = int(counts.max())

        rank = valid.long().cumsum(dim=1) - 1  # position within the row's valid tokens
        r, c = rank // w_, rank % w_
        band = r * hp_ // h_
        t = counts[:, None]
        q, rem = t // hp_, t % hp_
        cells_in_band = q + (band < rem).long()
        offset = band * q + torch.minimum(band, rem)
        cell = offset + c * cells_in_band // w_
        cell = torch.where(valid, cell, torch.full_like(cell, -1))

        # Sums on rows divided by a power of two when their magnitude is extreme (exact), so
        # bfloat16 tokens near 1e38 cannot overflow the float32 sum.
        x, scale = safe_scale(tokens, None if context.uniform_count is not None else valid)  # no padding: no mask
        sums, sizes = ops.merge_into(x, cell, t_max)
        pos = torch.arange(n, device=tokens.device).expand(b, n)
        first = torch.full((b, t_max + 1), n, dtype=torch.long, device=tokens.device)
        first.scatter_reduce_(1, torch.where(valid, cell, t_max), pos, reduce="amin")
        slots = ops.slot_mask(counts, t_max)
        indices = first[:, :t_max].masked_fill(~slots, -1)
        features = unscale(sums / sizes.clamp_min(1).unsqueeze(-1), scale, tokens.dtype)
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info={"cell": cell})
