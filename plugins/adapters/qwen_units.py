"""Reduce variable-length token sets (images, frames, videos) laid out flat, one after another.

Qwen-VL models keep the visual tokens of all images of a batch in one flat ``(S, D)``
tensor (dynamic resolution: every image has its own size). Each *unit* (an image, a
video frame, or a whole video, see :class:`Units`) is reduced on its own budget. The
units are padded into a ``(U, N_max, D)`` batch with a validity mask and the reducer is
called once per distinct patch grid (a reducer that uses ``context.grid`` needs one
grid per call); for the usual batch of same-sized images that is a single call.

Nothing here knows a specific model; the Qwen adapter supplies the context builder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce import Reducer, ReductionContext, Stage

Grid = tuple[int, int] | None
ContextFactory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Grid], ReductionContext]


@dataclass
class Units:
    """Token sets stored flat, unit after unit.

    Attributes:
        lens: host list, tokens of each unit.
        grids: per unit ``(h, w)`` token grid (raster order), or ``None`` when the
            tokens no longer form a full grid (after an earlier reduction).
        item: ``(U,)`` long, which image/video each unit belongs to.
        row: ``(U,)`` long, which sequence of the batch each unit's tokens sit in.
        frames: per unit, ``(T, tokens per frame)`` of a whole-video unit (its frames lie
            one after another in its original layout), ``None`` for any other unit; it
            stays with the unit through every step.
    """

    lens: list[int]
    grids: list[Grid]
    item: torch.Tensor
    row: torch.Tensor
    frames: list[tuple[int, int] | None] = field(default_factory=list)

    def frame_count(self, u: int) -> int | None:
        """Frames of unit ``u`` when it is a whole video, else ``None``."""
        return self.frames[u][0] if self.frames and self.frames[u] else None

    @property
    def count(self) -> int:
        return len(self.lens)

    def lengths(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.lens, dtype=torch.long, device=device)

    def offsets(self, device: torch.device) -> torch.Tensor:
        lengths = self.lengths(device)
        return torch.cumsum(lengths, 0) - lengths

    def after(self, lens_out: list[int]) -> Units:
        """The same units after a reduction to ``lens_out`` tokens (grids kept only where nothing was removed)."""
        grids = [g if n_out == n_in else None for g, n_in, n_out in zip(self.grids, self.lens, lens_out)]
        return Units(lens_out, grids, self.item, self.row, self.frames)


@dataclass
class StepResult:
    """Output of one reducer step over all units.

    Attributes:
        tokens: ``(S_out, D)`` kept (possibly merged) features, unit after unit.
        source: ``(S_out,)`` flat index into the step's input of each output token
            (its representative token: the kept token, or e.g. the top-left token of a pooled cell).
        units: the units after the step.
        lens_in: tokens of each unit before the step.
        info: per unit, the reducer's diagnostics sliced to that unit.
        seconds: wall time of the step (host clock).
    """

    tokens: torch.Tensor
    source: torch.Tensor
    units: Units
    lens_in: list[int]
    info: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _slice_info(info: dict[str, Any], row: int, rows: int, n_max: int, n: int) -> dict[str, Any]:
    """The part of a batched ``Reduction.info`` that belongs to one row (tensors with a batch dim)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            value = value[row]
            if value.dim() >= 1 and value.shape[0] == n_max:
                value = value[:n]
        out[key] = value
    return out


def run_step(
    reducer: Reducer,
    stage: Stage,
    flat: torch.Tensor,
    units: Units,
    make_context: ContextFactory,
) -> StepResult:
    """Reduce every unit of ``flat`` with ``reducer`` (one padded call per distinct grid).

    Args:
        reducer: the step's reducer (its own budget applies per unit).
        stage: the stage being run (set on the context).
        flat: ``(S, D)`` tokens of all units, unit after unit.
        units: the unit layout of ``flat``.
        make_context: ``(unit_ids (G,), index (G, N), valid (G, N), grid) -> ReductionContext``,
            where ``index`` holds flat indices into ``flat`` (0 at padding).
    """
    start = time.perf_counter()
    device = flat.device
    lengths = units.lengths(device)
    offsets = units.offsets(device)
    # One call per (grid, frames): both are host values a reducer may read from the context.
    groups: dict[tuple[Grid, int | None], list[int]] = {}
    for u, grid in enumerate(units.grids):
        groups.setdefault((grid, units.frame_count(u)), []).append(u)

    tokens_out, source_out, unit_out = [], [], []
    info: list[dict[str, Any]] = [{} for _ in range(units.count)]
    for (grid, frames), ids in groups.items():
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        n_max = max(units.lens[u] for u in ids)
        arange = torch.arange(n_max, device=device)
        valid = arange < lengths[ids_t].unsqueeze(1)
        index = (offsets[ids_t].unsqueeze(1) + arange).masked_fill(~valid, 0)
        batch = flat[index].masked_fill(~valid.unsqueeze(-1), 0)
        context = make_context(ids_t, index, valid, grid)
        context.stage = stage
        context.frames = frames
        if frames is None:  # not whole videos: no frame layout, whatever the factory gave
            context.frame_index = None
        red = reducer(batch, mask=valid, context=context)
        src = torch.gather(index, 1, red.indices.clamp(min=0))
        tokens_out.append(red.tokens[red.valid])
        source_out.append(src[red.valid])
        unit_out.append(ids_t.unsqueeze(1).expand_as(red.valid)[red.valid])
        for j, u in enumerate(ids):
            info[u] = _slice_info(red.info, j, len(ids), n_max, units.lens[u])

    tokens = torch.cat(tokens_out)
    source = torch.cat(source_out)
    unit_of = torch.cat(unit_out)
    if len(groups) > 1:  # put the units back in their flat order; stable keeps each unit's token order
        order = torch.sort(unit_of, stable=True).indices
        tokens, source, unit_of = tokens[order], source[order], unit_of[order]
    lens_out = torch.bincount(unit_of, minlength=units.count).tolist()
    return StepResult(
        tokens=tokens,
        source=source,
        units=units.after(lens_out),
        lens_in=list(units.lens),
        info=info,
        seconds=time.perf_counter() - start,
    )
