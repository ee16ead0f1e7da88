"""Shrinking a token sequence to its kept tokens, and keeping decoding consistent afterwards.

After an encoder-side reduction, every row of the batch keeps its text tokens and only
the kept image/video placeholders. Rows may shrink by different amounts; shortened rows
are **left**-padded (so the last prompt token of every row stays in the last column,
which is what ``generate()`` reads) and an attention mask is created if there was none.

The KV cache then holds the shortened sequence while the caller (``generate()`` or a
hand-written loop) keeps book on the full one: its attention mask and its position ids
grow from the *unreduced* prompt length. :class:`DecodeState` translates those inputs of
later forward calls that continue the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.errors import InvalidInputError


def sequence_positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``(B, L)`` 1-D positions ``0, 1, ...`` over the real tokens of each row (0 at padding)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@dataclass
class Shrink:
    """Where each slot of the shortened, left-padded sequence comes from.

    Attributes:
        index: ``(B, L_red)`` column in the original sequence, ``-1`` at new padding.
        slot: ``(B, L_red)`` bool, real slots.
        padded: whether any row needed new padding.
    """

    index: torch.Tensor
    slot: torch.Tensor
    padded: bool

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Shrink:
        """Left-aligned gather index of the ``True`` columns of ``keep (B, L)``."""
        b, n = keep.shape
        counts = keep.sum(dim=1)
        length = int(counts.max()) if b else 0
        pad = length - counts
        slot_of = pad.unsqueeze(1) + keep.long().cumsum(1) - 1
        # Dropped columns write to a spare slot ``length`` that is cut off.
        target = torch.where(keep, slot_of, torch.full_like(slot_of, length))
        index = torch.full((b, length + 1), -1, dtype=torch.long, device=keep.device)
        index.scatter_(1, target, torch.arange(n, device=keep.device).expand(b, n))
        index = index[:, :length]
        return cls(index=index, slot=index >= 0, padded=bool((pad > 0).any()))

    def take(self, x: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """``x[..., b, index[b]]`` along the last dim (batch on dim -2), ``fill`` at new padding."""
        idx = self.index.clamp(min=0)
        idx = idx.expand(x.shape[:-2] + idx.shape)
        out = torch.gather(x, -1, idx)
        return out.masked_fill(~self.slot.expand(out.shape), fill)

    def mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The shortened 2-D attention mask (``None`` stays ``None`` when no padding was added)."""
        if attention_mask is None:
            return self.slot.long() if self.padded else None
        return self.take(attention_mask, 0)


@dataclass
class DecodeState:
    """How to translate the inputs of forward calls that continue a reduced prefill's cache.

    Attributes:
        full_len: the unreduced prompt length the caller keeps book on.
        red_len: the shortened prompt length (what the cache holds after prefill).
        mask_prefix: ``(B, red_len)`` shortened prompt mask, or ``None`` when the prompt had no mask
            and needed no new padding.
        next_pos: ``(B, 1)`` rotary position of the first token after the prompt.
        text_shift: ``(B, 1)`` added to the 1-D sequence row of 4-row position ids.
        rope_shift: ``(3, B, 1)`` added to caller-given 3-D position ids.
    """

    full_len: int
    red_len: int
    mask_prefix: torch.Tensor | None
    next_pos: torch.Tensor
    text_shift: torch.Tensor
    rope_shift: torch.Tensor

    def translate(self, kw: dict[str, Any]) -> dict[str, Any]:
        """Map the caller's full-length mask / positions of a continuation call to the shortened cache."""
        cache = kw["cache"]
        past = int(cache.get_seq_length())
        extra = past - self.red_len  # tokens appended since the prefill
        ids = kw.get("input_ids")
        emb = kw.get("inputs_embeds")
        ref = ids if ids is not None else emb
        batch, q = ref.shape[0], ref.shape[1]
        if batch != self.next_pos.shape[0]:
            raise InvalidInputError(
                f"a forward continuing a reduced prompt has batch size {batch}, but the prompt had "
                f"{self.next_pos.shape[0]} rows; continue with the same batch"
            )
        device = ref.device
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            expected = self.full_len + extra + q
            if mask.shape[1] != expected:
                raise InvalidInputError(
                    f"attention_mask has {mask.shape[1]} columns; continuing a reduced prompt of {self.full_len} "
                    f"tokens with {extra} cached and {q} new tokens it must have {expected}"
                )
            prefix = self.mask_prefix if self.mask_prefix is not None else mask.new_ones(batch, self.red_len)
            kw["attention_mask"] = torch.cat([prefix.to(mask.dtype), mask[:, self.full_len :]], dim=1)
        elif mask is None and self.mask_prefix is not None:
            tail = self.mask_prefix.new_ones(batch, extra + q)
            kw["attention_mask"] = torch.cat([self.mask_prefix, tail], dim=1)

        pos = kw.get("position_ids")
        if pos is None:
            step = torch.arange(q, device=device) + extra
            kw["position_ids"] = (self.next_pos.to(device) + step).unsqueeze(0).expand(3, batch, q)
        elif pos.dim() == 3 and pos.shape[0] == 4:
            kw["position_ids"] = torch.cat([pos[:1] + self.text_shift, pos[1:] + self.rope_shift], dim=0)
        elif pos.dim() == 3:
            kw["position_ids"] = pos + self.rope_shift
        else:  # (B, q) text positions: the model expands them to the three axes
            kw["position_ids"] = pos.unsqueeze(0) + self.rope_shift
        return kw
