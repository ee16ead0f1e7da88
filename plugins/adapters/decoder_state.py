"""The per-forward state of :class:`~tokenreduce_plugins.adapters.decoder.DecoderReduction`.

A decoder forward goes through explicit phases, each an immutable object; a phase change
makes a new object (no boolean flags):

* :class:`NotStarted`: the decoder pre-hook ran, no hooked layer yet; what the caller
  said about this forward (image mask, grid, attention mask), the reduced cache it
  continues, and the position ids the model gives its rotary embedding.
* :class:`Passthrough`: nothing to reduce and a full-length cache: the stock forward.
* :class:`Reducing`: layers still run the stock computation (full sequence); the steps
  to come may remove tokens.
* :class:`Reduced`: from the last step's layer on, the sequence differs from stock
  (tokens were removed, or the cache's layers hold a reduced sequence): those layers get
  a rebuilt mask and rotary tables.

:class:`Forward` holds what does not change during one forward once it started,
:class:`Sequence` the current (possibly shortened) sequence, :class:`CacheState` what a
later forward on the same cache needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tokenreduce.ops import gather_rows

__all__ = ["CacheState", "Forward", "NotStarted", "PASSTHROUGH", "Passthrough", "Reduced", "Reducing", "Sequence"]


@dataclass(frozen=True, eq=False)
class CacheState:
    """What later forwards on the same cache need: per step, the padding mask of what that
    step's layers cache and the number of tokens removed so far in each row."""

    masks: tuple[torch.Tensor, ...]
    removed: tuple[torch.Tensor, ...]
    full_len: int


@dataclass(frozen=True, eq=False)
class NotStarted:
    """Before the first hooked layer: what the caller and the cache say about this forward."""

    attention_mask: Any
    image_mask: torch.Tensor | None
    grid: tuple[int, int] | None
    cache_state: CacheState | None = None  # the reduced cache this forward continues
    past0: int = 0  # tokens before this forward, counted at full length
    rope_ids: torch.Tensor | None = None  # the first position ids given to rotary_emb
    blocks: torch.Tensor | None = None  # (B, L_t) bidirectional run ids by absolute position (Gemma 3)

    def with_rope_ids(self, ids: torch.Tensor | None) -> NotStarted:
        """Keeps the first ids the rotary embedding sees (the decoder's own call)."""
        return self if self.rope_ids is not None else replace(self, rope_ids=ids)


@dataclass(frozen=True, eq=False)
class Passthrough:
    """Nothing to reduce on a full-length cache: every layer runs as stock."""


PASSTHROUGH = Passthrough()


@dataclass(frozen=True, eq=False)
class Forward:
    """What does not change during one forward once its first hooked layer ran."""

    cache: Any
    pad: torch.Tensor  # (B, past0 + q) bool padding mask of the full sequence (past + input)
    past0: int
    cache_state: CacheState | None
    image_input: torch.Tensor | None  # (B, q) this forward's image tokens; None: it has none
    grid: tuple[int, int] | None
    # Input, rotary tables and cached length of the layers whose q/k a later step reads
    # (filled by the layer hooks as the forward goes).
    captured: dict[int, tuple] = field(default_factory=dict)

    def past_mask(self, j: int) -> torch.Tensor:
        """``(B, P)`` padding mask of what the layers of step ``j`` held before this forward."""
        if self.cache_state is not None:
            return self.cache_state.masks[j]
        return self.pad[:, : self.past0]

    def past_removed(self, j: int) -> torch.Tensor:
        """``(B,)`` tokens removed before this forward in the layers of step ``j``."""
        if self.cache_state is not None:
            return self.cache_state.removed[j]
        return torch.zeros(self.pad.shape[0], dtype=torch.long, device=self.pad.device)

    def past_mask_for_layer(self, li: int, step_layers: list[int]) -> torch.Tensor:
        """``past_mask`` of the last step at or before layer ``li`` (the full past before the first)."""
        js = [j for j, layer in enumerate(step_layers) if layer <= li]
        return self.pad[:, : self.past0] if not js else self.past_mask(js[-1])


def _seq_gather(x: torch.Tensor, src: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Gather along the sequence dim (the one after ``batch_dim``) with ``src (B, L')`` (-1 -> 0)."""
    b = src.shape[0]
    shape = list(x.shape)
    shape[batch_dim] = b
    x = x.expand(*shape)
    idx = src.clamp(min=0)
    view = [1] * x.dim()
    view[batch_dim], view[batch_dim + 1] = b, src.shape[1]
    full = list(x.shape)
    full[batch_dim + 1] = src.shape[1]
    return torch.gather(x, batch_dim + 1, idx.view(view).expand(full))


def ids_gather(ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``(..., B|1, L)`` along the last dim."""
    return _seq_gather(ids, src, ids.dim() - 2)


def cos_gather(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Gather rotary tables ``(..., B|1, L, d)`` along the sequence dim."""
    return _seq_gather(t, src, t.dim() - 3)


@dataclass(frozen=True, eq=False)
class Sequence:
    """The current sequence of one forward, after the steps run so far (``q`` slots per row)."""

    index: torch.Tensor  # (B, q) input position of each slot, -1 = padding slot
    img: torch.Tensor  # (B, q) image token
    valid: torch.Tensor  # (B, q) not padding
    dropped_before: torch.Tensor  # (B, q) tokens removed before it in this forward
    total_dropped: torch.Tensor  # (B,) tokens removed in this forward so far
    rope_ids: torch.Tensor | None  # original ids given to rotary_emb, (..., B, q)
    layer_ids: torch.Tensor | None  # original `position_ids` kwarg of the layers (None: not given)
    cos_sin: tuple[torch.Tensor, torch.Tensor]  # stock (original) rotary tables
    blocks: torch.Tensor | None = None  # (B, q) bidirectional run id (-1: none), Gemma 3's image tokens

    def gather(self, src: torch.Tensor, drop: torch.Tensor) -> Sequence:
        """The sequence after removing ``drop (B, q)``: ``src (B, q')`` lists the kept slots (-1 = padding)."""
        slot = src >= 0
        dropped_before = self.dropped_before + drop.long().cumsum(dim=1)
        cos, sin = self.cos_sin
        return Sequence(
            index=gather_rows(self.index, src).masked_fill(~slot, -1),
            img=gather_rows(self.img, src) & slot,
            valid=gather_rows(self.valid, src) & slot,
            dropped_before=gather_rows(dropped_before, src).masked_fill(~slot, 0),
            total_dropped=self.total_dropped + drop.sum(dim=1),
            rope_ids=None if self.rope_ids is None else ids_gather(self.rope_ids, src),
            layer_ids=None if self.layer_ids is None else ids_gather(self.layer_ids, src),
            cos_sin=(cos_gather(cos, src), cos_gather(sin, src)),
            blocks=None if self.blocks is None else gather_rows(self.blocks, src).masked_fill(~slot, -1),
        )

    def shift(self, fwd: Forward, j: int) -> torch.Tensor:
        """``(B, q)`` tokens removed before each slot, this forward's and the cache's (step ``j``'s layers)."""
        return fwd.past_removed(j).unsqueeze(1) + self.dropped_before


# What each step's layers cache after this forward: (padding mask, tokens removed per row).
Saved = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True, eq=False)
class Reducing:
    """Layers run the stock computation; the steps to come may remove tokens."""

    fwd: Forward
    seq: Sequence
    saved: Saved = ()


@dataclass(frozen=True, eq=False)
class Reduced:
    """From step ``step``'s layer on, the layers see the reduced sequence with these inputs."""

    fwd: Forward
    seq: Sequence
    saved: Saved
    step: int
    cos_sin: Any  # rotary tables of the current slots: a (cos, sin) pair, or {layer: pair}
    layer_ids: torch.Tensor | None  # `position_ids` kwarg of the layers
    mask2d: torch.Tensor  # (B, P + q) padding mask of the reduced cache + this forward's slots
    masks: dict[str, Any] = field(default_factory=dict)  # per layer type, built once per step

    def table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of decoder layer ``layer``."""
        return self.cos_sin[layer] if isinstance(self.cos_sin, dict) else self.cos_sin
