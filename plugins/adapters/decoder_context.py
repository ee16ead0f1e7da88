"""What a reducer sees at a decoder layer: its :class:`ReductionContext` and its record.

Everything is read from the current sequence (:class:`~.decoder_state.Sequence`) and the
layer's input; attention rows and keys are recomputed by :mod:`.decoder_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tokenreduce.adapter import StageRecord
from tokenreduce.context import ReductionContext
from tokenreduce.ops import gather_rows
from tokenreduce.pipeline import Step
from tokenreduce.stages import Stage

from .decoder_attention import attention_rows, layer_keys, reads
from .decoder_state import Reduced, Reducing, ids_gather
from .units import slice_info

__all__ = ["StepSite", "step_context", "step_record"]


@dataclass(frozen=True, eq=False)
class StepSite:
    """One step at its layer: the forward's phase there and that layer's inputs."""

    phase: Reducing | Reduced
    index: int  # the step's index in the reduction's steps
    step: Step
    layer_idx: int
    hidden: torch.Tensor  # (B, q, D) the layer's input
    kwargs: dict  # the layer's stock keyword arguments
    layers: nn.ModuleList
    step_layers: list[int]  # layer of every step of the reduction
    positions: str
    apply_rotary: Callable | None

    @property
    def renumbered(self) -> bool:
        """Whether the sequence here differs from stock (reduced earlier in this forward or in the cache)."""
        return isinstance(self.phase, Reduced) or self.phase.fwd.cache_state is not None


def step_context(site: StepSite, img_pos: torch.Tensor, img_valid: torch.Tensor) -> ReductionContext:
    """The context of the step's reducer for the image tokens at ``img_pos (B, N)`` (``img_valid``: real ones)."""
    reducer = site.step.reducer
    text_pos, text_mask = _instruction(site)
    text_embeds = gather_rows(site.hidden, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0)
    attention = keys = text_keys = None
    if "attention" in reducer.required_context:
        attention = _attention(site, text_pos, img_pos, img_valid)
    if {"keys", "text_keys"} & set(reducer.required_context):
        li, h, cos_sin, _ = _source(site)
        k = layer_keys(site.layers[li], h, cos_sin, site.apply_rotary)
        keys = gather_rows(k, img_pos).masked_fill(~img_valid.unsqueeze(-1), 0)
        text_keys = gather_rows(k, text_pos).masked_fill(~text_mask.unsqueeze(-1), 0)
    return ReductionContext(
        stage=Stage.LLM_LAYER,
        layer=site.layer_idx,
        text_embeds=text_embeds,
        text_mask=text_mask,
        attention=attention,
        keys=keys,
        text_keys=text_keys,
        positions=_image_positions(site, img_pos),
        grid=_grid(site, img_valid),
        extra={"image_positions": img_pos},
    )


def _instruction(site: StepSite) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens after the row's last image token (the instruction), left-aligned: positions (-1 = none) and mask."""
    seq = site.phase.seq
    b, q, _ = site.hidden.shape
    pos = torch.arange(q, device=site.hidden.device).expand(b, q)
    last_img = torch.where(seq.img, pos, torch.full_like(pos, -1)).max(dim=1).values
    is_text = seq.valid & ~seq.img & (pos > last_img.unsqueeze(1)) & (last_img >= 0).unsqueeze(1)
    n_text = is_text.sum(dim=1)
    t_max = max(int(n_text.max()), 1)
    text_pos = torch.sort(torch.where(is_text, pos, pos + q), dim=1).values[:, :t_max]
    text_mask = torch.arange(t_max, device=site.hidden.device).unsqueeze(0) < n_text.unsqueeze(1)
    return text_pos.masked_fill(~text_mask, -1), text_mask


def _image_positions(site: StepSite, img_pos: torch.Tensor) -> torch.Tensor | None:
    """Current position ids of the image tokens, ``(B, N)`` or ``(B, N, R)`` (M-RoPE)."""
    seq = site.phase.seq
    ids = seq.rope_ids if seq.rope_ids is not None else seq.layer_ids
    if ids is None:
        return None
    if site.renumbered and site.positions == "compact":
        ids = ids - seq.shift(site.phase.fwd, site.index)
    g = ids_gather(ids, img_pos)
    return g if g.dim() == 2 else g.movedim(0, -1).reshape(img_pos.shape[0], img_pos.shape[1], -1)


def _grid(site: StepSite, img_valid: torch.Tensor) -> tuple[int, int] | None:
    """The caller's grid, only while every row still holds exactly that grid's tokens, unreduced."""
    grid = site.phase.fwd.grid
    if grid is not None and not site.renumbered and bool((img_valid.sum(1) == grid[0] * grid[1]).all()):
        return grid
    return None


def _attention(site: StepSite, text_pos: torch.Tensor, img_pos: torch.Tensor, img_valid: torch.Tensor) -> torch.Tensor:
    """``(B, Q, N)`` the head-averaged attention the query rows pay to the image tokens."""
    seq, fwd = site.phase.seq, site.phase.fwd
    b, q, _ = site.hidden.shape
    if reads(site.step)[0] == "last":
        pos = torch.arange(q, device=site.hidden.device).expand(b, q)
        qidx = torch.where(seq.valid, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    else:
        qidx = text_pos
    li, h, cos_sin, past = _source(site)
    past_keys = past_valid = None
    if past > 0:
        past_keys = fwd.cache.layers[li].keys[:, :, :past]
        past_valid = fwd.past_mask_for_layer(li, site.step_layers)
    probs = attention_rows(
        site.layers[li], h, cos_sin, qidx, seq.valid,
        past_keys=past_keys, past_valid=past_valid, apply_rotary=site.apply_rotary,
    )
    cols = (img_pos + probs.shape[-1] - q).clamp(min=0)
    attention = torch.gather(probs, 2, cols.unsqueeze(1).expand(-1, qidx.shape[1], -1))
    return attention.masked_fill(~img_valid.unsqueeze(1), 0).to(site.hidden.dtype)


def _source(site: StepSite):
    """Layer whose q/k the step reads (``attention_layer``), its input, rotary tables and cached length."""
    phase = site.phase
    if reads(site.step)[1] == "previous":
        li = site.layer_idx - 1
        h, cos_sin, past = phase.fwd.captured[li]
        return li, h, cos_sin, past
    # The layer's stock kwargs hold full-length tables once the sequence was reduced.
    cos_sin = phase.table(site.layer_idx) if isinstance(phase, Reduced) else site.kwargs.get("position_embeddings")
    cache = phase.fwd.cache
    past = cache.get_seq_length(site.layer_idx) if cache is not None else 0
    return site.layer_idx, site.hidden, cos_sin, past


def step_record(step: Step, n_img: torch.Tensor, red, seconds: float) -> StageRecord:
    """The step's :class:`StageRecord` (one unit per batch row)."""
    b = n_img.shape[0]
    counts = red.counts
    return StageRecord(
        stage=Stage.LLM_LAYER,
        reducer=step.reducer.name,
        layer=step.layer,
        tokens_before=n_img.tolist(),
        tokens_after=counts.tolist(),
        indices=[red.indices[row, : int(counts[row])].detach() for row in range(b)],
        info=[slice_info(red.info, row, b) for row in range(b)],
        seconds=seconds,
    )
