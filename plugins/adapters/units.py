"""The encoder-side engine every model family runs on: units -> padded batch per grid -> reducer -> index tracking.

A *unit* is what one budget applies to: an image, a frame, a whole video, an anyres part.
A family lays its features out flat, unit after unit (``(S, D)``), and describes the units
(:class:`Units`: lengths, grids, frame layout, the item and batch row of each); the engine
does the rest the same way for every family:

* :func:`run_step` pads the units into one ``(U, N_max, D)`` batch per distinct
  ``(grid, frames, budget)`` (a reducer reading ``context.grid`` needs one grid per call)
  with a validity mask (none when the lengths are equal: reducers then skip reading one back
  from the GPU and CUDA-graph replay applies), slices the context to the units' tokens
  (:class:`ContextSource`), calls the reducer, and tracks each kept token's source.
* :func:`encoder_steps` chains the ``vision_encoder`` step, the family's projector and the
  ``projector`` steps, composing the sources, and hands each step to a recorder
  (:func:`record`: one :class:`~tokenreduce.adapter.StageRecord` entry per unit).

Nothing here knows a model; families supply tokens, units, a projector and a context source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce import ReductionContext, Stage, StageRecord
from tokenreduce.budget import Budget
from tokenreduce.pipeline import Step
from tokenreduce.reduction import Reduction
from tokenreduce.sync import device_list

Grid = tuple[int, int] | None
# The adapter's reducer call: (step, tokens (G, N, D), mask or None, context, budget or None) -> (reduction, seconds).
Call = Callable[[Step, torch.Tensor, torch.Tensor | None, ReductionContext, Any], tuple[Reduction, float]]
ENCODER_STAGES = (Stage.VISION_ENCODER, Stage.PROJECTOR)


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
        budgets: per unit, a budget that overrides the step's (anyres parts split an
            image's budget), or empty: every unit takes the step's own.
        item_ids: ``item`` on the host where the family knows it (``None``: read it back when
            needed, a device synchronisation).
    """

    lens: list[int]
    grids: list[Grid]
    item: torch.Tensor
    row: torch.Tensor
    frames: list[tuple[int, int] | None] = field(default_factory=list)
    budgets: list[Budget | None] = field(default_factory=list)
    item_ids: list[int] | None = None

    @classmethod
    def rows(cls, n: int, length: int, grid: Grid, device: torch.device, row: torch.Tensor | None = None) -> Units:
        """``n`` units of ``length`` tokens each (one image per tower row), item ``i`` = unit ``i``."""
        item = torch.arange(n, device=device)
        return cls([length] * n, [grid] * n, item, item if row is None else row, item_ids=list(range(n)))

    @classmethod
    def from_grids(cls, items: list[tuple[int, tuple[int, int, int] | None]], per_video: bool, video: bool,
                   row_of_token: torch.Tensor) -> Units:
        """The units of items given as ``(tokens, (t, h, w) token grid or None)``.

        An item with a grid gives ``t`` frame units of ``(h, w)``, or one ``(t * h, w)`` unit
        when ``per_video`` (the frames stacked; carrying its frame layout when ``video``); an
        item without one (or whose grid does not match its tokens) is one unit without a grid.
        ``row_of_token``: ``(S,)`` the batch row of each flat token (from the placeholder mask).
        """
        lens: list[int] = []
        grids: list[Grid] = []
        item_of: list[int] = []
        frames: list[tuple[int, int] | None] = []
        for i, (n, thw) in enumerate(items):
            t, h, w = thw if thw is not None and thw[0] * thw[1] * thw[2] == n else (1, 0, 0)
            whole = per_video or t == 1 or h == 0
            count = 1 if whole else t
            lens += [n] if whole else [h * w] * t
            grids += [None if not h else (t * h, w) if whole else (h, w)] * count
            item_of += [i] * count
            frames += [((t, h * w) if per_video and video and h else None)] * count
        device = row_of_token.device
        lengths = device_list(lens, device)
        rows = row_of_token[torch.cumsum(lengths, 0) - lengths]
        return cls(lens, grids, device_list(item_of, device), rows, frames, item_ids=item_of)

    def frame_count(self, u: int) -> int | None:
        """Frames of unit ``u`` when it is a whole video, else ``None``."""
        return self.frames[u][0] if self.frames and self.frames[u] else None

    @property
    def count(self) -> int:
        return len(self.lens)

    def lengths(self, device: torch.device) -> torch.Tensor:
        return device_list(self.lens, device)

    def offsets(self, device: torch.device) -> torch.Tensor:
        lengths = self.lengths(device)
        return torch.cumsum(lengths, 0) - lengths

    def after(self, lens_out: list[int]) -> Units:
        """The same units after a reduction to ``lens_out`` tokens (grids kept only where nothing was removed)."""
        grids = [g if n_out == n_in else None for g, n_in, n_out in zip(self.grids, self.lens, lens_out)]
        return Units(lens_out, grids, self.item, self.row, self.frames, self.budgets, self.item_ids)

    def items_on_host(self) -> list[int]:
        """``item`` as a host list (read back from the device only where the family did not give it)."""
        return self.item_ids if self.item_ids is not None else self.item.tolist()

    def item_lengths(self, items: int) -> list[int]:
        """Tokens of each of ``items`` items, the sum over its units, on the host."""
        out = [0] * items
        for item, n in zip(self.items_on_host(), self.lens):
            out[item] += n
        return out


@dataclass
class ContextSource:
    """Where a step's context comes from, before slicing it to the units' current tokens.

    Attributes:
        per_token: context fields aligned with the *original* flat tokens (``(S0, ...)``):
            ``cls_attention``, ``keys``, ``positions`` or any ``extra`` key (``extra.<key>``).
        per_unit: fields with one entry per unit (a frame's ``cls_token``).
        per_item: fields with one entry per item (image or video): a unit takes its item's.
        per_row: fields with one entry per batch row of the prompt (``text_embeds``,
            ``text_mask``): a unit takes its row's.
        extra: ``unit_ids (G,) -> dict`` of further ``context.extra`` entries.
    """

    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    per_unit: dict[str, torch.Tensor] = field(default_factory=dict)
    per_item: dict[str, torch.Tensor] = field(default_factory=dict)
    per_row: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: Callable[[torch.Tensor], dict[str, Any]] | None = None

    def context(self, units: Units, ids: list[int], unit_ids: torch.Tensor, original: torch.Tensor,
                valid: torch.Tensor, offsets0: torch.Tensor, grid: Grid, frames: int | None) -> ReductionContext:
        """The context of units ``ids`` (also on the device: ``unit_ids``) whose tokens came from the
        original flat indices ``original (G, N)``."""
        ctx = ReductionContext(grid=grid, frames=frames, extra={} if self.extra is None else self.extra(unit_ids))
        for name, value in self.per_token.items():
            sliced = value[original]
            if name.startswith("extra."):
                ctx.extra[name[6:]] = sliced
            else:
                setattr(ctx, name, sliced)
        for name, value in self.per_unit.items():
            setattr(ctx, name, value[unit_ids])
        for name, value in self.per_item.items():
            setattr(ctx, name, value[units.item[unit_ids]])
        for name, value in self.per_row.items():
            setattr(ctx, name, value[units.row[unit_ids]])
        if frames is not None:  # one whole video per row: the frame of each token, from its original place
            per_frame = device_list([units.frames[u][1] for u in ids], original.device)
            local = original - offsets0[unit_ids].unsqueeze(1)
            ctx.frame_index = (local // per_frame.unsqueeze(1)).masked_fill(~valid, 0)
        return ctx


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
        identity: no unit lost a token: ``tokens`` is the step's input tensor itself.
    """

    tokens: torch.Tensor
    source: torch.Tensor
    units: Units
    lens_in: list[int]
    info: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    identity: bool = False


def slice_info(info: dict[str, Any], row: int, rows: int, n_max: int | None = None, n: int | None = None) -> dict[str, Any]:
    """The part of a batched ``Reduction.info`` that belongs to one row (tensors with a batch dim),
    cut from the padded length ``n_max`` to the row's ``n`` tokens when both are given."""
    out = {}
    for key, value in info.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            value = value[row]
            if n is not None and value.dim() >= 1 and value.shape[0] == n_max:
                value = value[:n]
        out[key] = value
    return out


def run_step(step: Step, call: Call, flat: torch.Tensor, units: Units, source: ContextSource,
             original: torch.Tensor | None, offsets0: torch.Tensor) -> StepResult:
    """Reduce every unit of ``flat (S, D)`` with ``step`` (one padded call per distinct grid, frames, budget).

    ``original``: ``(S,)`` the original flat index of each current token (``None``: the
    tokens are the originals); ``offsets0``: ``(U,)`` each unit's first original index.
    """
    start = time.perf_counter()
    device = flat.device
    lengths = units.lengths(device)
    offsets = torch.cumsum(lengths, 0) - lengths
    groups: dict[tuple, list[int]] = {}
    identity = True
    for u, grid in enumerate(units.grids):  # host values a reducer may read: one call per distinct set
        budget = units.budgets[u] if units.budgets else None
        if units.lens[u] == 0 or budget == 0:  # nothing to reduce, or a unit that keeps nothing
            identity = identity and units.lens[u] == 0
            continue
        groups.setdefault((grid, units.frame_count(u), budget), []).append(u)

    tokens_out, source_out, unit_out = [flat[:0]], [offsets[:0]], [offsets[:0]]
    info: list[dict[str, Any]] = [{} for _ in range(units.count)]
    known: dict[int, int] = {}  # units whose kept count is known on the host
    for (grid, frames, budget), ids in groups.items():
        ids_t = device_list(ids, device)
        n_max = max(units.lens[u] for u in ids)
        equal = all(units.lens[u] == n_max for u in ids)
        arange = torch.arange(n_max, device=device)
        valid = arange < lengths[ids_t].unsqueeze(1)
        index = (offsets[ids_t].unsqueeze(1) + arange).masked_fill(~valid, 0)
        if equal and len(ids) == units.count:
            batch = flat.reshape(len(ids), n_max, -1)  # all units, in order: no gather
        else:
            batch = flat[index].masked_fill(~valid.unsqueeze(-1), 0)
        ctx = source.context(units, ids, ids_t, index if original is None else original[index], valid, offsets0, grid, frames)
        ctx.stage = step.stage
        # Equal lengths: no mask, so every row keeps one count known on the host (no device read).
        red, _ = call(step, batch, None if equal else valid, ctx, budget)
        identity = identity and bool(red.info.get("identity"))
        src = torch.gather(index, 1, red.indices.clamp(min=0))
        if equal:  # no mask: every row kept the same host-known count, every slot is real (no device read)
            kept_here = red.indices.shape[1]
            tokens_out.append(red.tokens.reshape(-1, red.tokens.shape[-1]))
            source_out.append(src.reshape(-1))
            unit_out.append(ids_t.unsqueeze(1).expand(-1, kept_here).reshape(-1))
            for u in ids:
                known[u] = kept_here
        else:
            tokens_out.append(red.tokens[red.valid])
            source_out.append(src[red.valid])
            unit_out.append(ids_t.unsqueeze(1).expand_as(red.valid)[red.valid])
        for j, u in enumerate(ids):
            info[u] = slice_info(red.info, j, len(ids), n_max, units.lens[u])

    seconds = time.perf_counter() - start
    if identity:  # nothing removed: keep the input tensor (a copy may round differently downstream in bf16)
        arange = torch.arange(flat.shape[0], device=device)
        return StepResult(flat, arange, units, list(units.lens), info, seconds, identity=True)
    tokens = torch.cat(tokens_out)
    src = torch.cat(source_out)
    unit_of = torch.cat(unit_out)
    if len(groups) > 1:  # put the units back in their flat order; stable keeps each unit's token order
        order = torch.sort(unit_of, stable=True).indices
        tokens, src, unit_of = tokens[order], src[order], unit_of[order]
    if all(u in known or units.lens[u] == 0 for u in range(units.count)):
        lens_out = [known.get(u, 0) for u in range(units.count)]
    else:
        lens_out = torch.bincount(unit_of, minlength=units.count).tolist()
    return StepResult(tokens, src, units.after(lens_out), list(units.lens), info, seconds)


Recorder = Callable[[Step, StepResult, torch.Tensor], None]


def call_reducer(step: Step, tokens: torch.Tensor, mask: torch.Tensor | None, context: ReductionContext,
                 budget: Any = None) -> tuple[Reduction, float]:
    """A step's reducer on one padded batch, timed (the default :data:`Call`)."""
    start = time.perf_counter()
    red = step.reducer(tokens, budget, mask=mask, context=context)
    return red, time.perf_counter() - start


def encoder_steps(
    steps: dict[Stage, Step | None],
    call: Call,
    tokens: torch.Tensor,
    units: Units,
    project: Callable[[torch.Tensor, Units, bool], torch.Tensor],
    source: ContextSource,
    recorder: Recorder,
    plan: Callable[[Step, Units], Units] | None = None,
) -> tuple[torch.Tensor, Units, torch.Tensor | None]:
    """The encoder-side steps over all units: the ``vision_encoder`` step, the projector, the ``projector`` step.

    ``tokens (S, D_v)``: the features ``vision_encoder`` steps see (unit after unit);
    ``project(tokens, units, reduced)``: the family's projector on the current tokens
    (``reduced``: a step removed some, so the stock output cannot be reused). ``recorder``
    gets every step's result and the original flat index of each kept token; ``plan(step,
    units)``, when given, returns the units with per-unit budgets for that step.
    Returns the projected, reduced tokens, their units and their original flat indices
    (``None``: nothing was removed).
    """
    offsets0 = units.offsets(tokens.device)
    original: torch.Tensor | None = None
    for stage in ENCODER_STAGES:
        if stage is Stage.PROJECTOR:
            tokens = project(tokens, units, original is not None)
        step = steps.get(stage)  # a pipeline has at most one step per encoder-side stage
        if step is None:
            continue
        res = run_step(step, call, tokens, plan(step, units) if plan is not None else units, source, original, offsets0)
        if not res.identity:
            original = res.source if original is None else original[res.source]
            tokens, units = res.tokens, res.units
        recorder(step, res, res.source if original is None else original)
    return tokens, units, original


def record(records: list[StageRecord], offsets0: torch.Tensor, info: Callable[[int], dict] | None = None) -> Recorder:
    """A recorder that appends one :class:`StageRecord` per step, one entry per unit.

    Indices are into each unit's original tokens; ``info(item)`` adds entries to each unit's info.
    """

    def add(step: Step, res: StepResult, original: torch.Tensor) -> None:
        lens = res.units.lens
        unit_of = torch.repeat_interleave(torch.arange(len(lens), device=original.device),
                                          res.units.lengths(original.device), output_size=sum(lens))
        local = original - offsets0[unit_of]
        if info is not None:
            for entry, item in zip(res.info, res.units.items_on_host()):
                entry.update(info(item))
        records.append(StageRecord(step.stage, step.reducer.name, None, res.lens_in, list(lens),
                                   list(torch.split(local, lens)), res.info, res.seconds))

    return add


def keep_mask(original: torch.Tensor | None, total: int, device: torch.device) -> torch.Tensor:
    """``(total,)`` bool: which original flat tokens survive."""
    if original is None:
        return torch.ones(total, dtype=torch.bool, device=device)
    # index_fill_, not ``keep[original] = True``: that copies the scalar to the device, waiting for it.
    return torch.zeros(total, dtype=torch.bool, device=device).index_fill_(0, original, True)
