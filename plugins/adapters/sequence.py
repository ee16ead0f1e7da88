"""Shrinking token sequences consistently after encoder-side reduction, and decoding afterwards.

When an image keeps ``T`` of its ``N`` features, its run of ``N`` placeholder tokens must
become ``T`` placeholders, and every per-token tensor (input ids, attention mask, labels,
position ids, token type ids) must lose the same positions (:class:`Shrink`), so that
transformers' own placeholder-count checks pass and the text around the image is untouched.

The KV cache then holds the shortened sequence while a caller that continues it keeps book
on the full one: its attention mask and position ids grow from the *unreduced* prompt
length. :class:`DecodeState` translates those inputs of later forward calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.errors import InvalidInputError
from tokenreduce.ops import gather_rows
from tokenreduce.sync import host_reads_free


@dataclass(frozen=True)
class PromptFacts:
    """What shortening a prompt needs to know on the host, read from the device in one go.

    Read before the vision tower is queued, the read waits for nothing; and with the items'
    kept counts (host values of the engine), the shortened rows' lengths follow without
    reading anything after the tower (:meth:`lengths`), so the host keeps queueing while
    the GPU runs the tower and the reducers.

    Attributes:
        real: real (unpadded) tokens per row.
        placeholders: per placeholder id, its tokens per row, padding excluded.
        stray: some placeholder sits in padding (then :meth:`lengths` cannot tell).
        right: some row ends in padding (the caller padded on the right).
    """

    real: list[int]
    placeholders: dict[int, list[int]]
    stray: bool
    right: bool

    @classmethod
    def read(cls, ids: torch.Tensor, mask: torch.Tensor | None, token_ids: list[int]) -> PromptFacts:
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        cols = [valid.sum(1), (~valid[:, -1]).long()]
        for token_id in token_ids:
            ph = ids == token_id
            cols += [(ph & valid).sum(1), ph.sum(1)]
        host = torch.stack(cols).tolist()  # the one device read
        inside, every = host[2::2], host[3::2]
        return cls(host[0], dict(zip(token_ids, inside)), inside != every, any(host[1]))

    def count(self, token_id: int) -> int:
        """Placeholders of ``token_id`` in the prompt."""
        return sum(self.placeholders[token_id])

    def lengths(self, kept: dict[int, list[int]], stock: dict[int, list[int]]) -> list[int] | None:
        """Real tokens of each row once item ``i`` of placeholder id ``t`` keeps ``kept[t][i]`` of
        its ``stock[t][i]`` placeholders (items fill the placeholders in row-major order);
        ``None`` where the facts cannot tell (a placeholder in padding, an item across rows,
        counts that do not match the prompt: the caller's own checks report those)."""
        if self.stray:
            return None
        rows = list(self.real)
        for token_id, kept_t in kept.items():
            per_row = self.placeholders.get(token_id)
            if per_row is None or sum(stock[token_id]) != sum(per_row):
                return None
            row, room = 0, per_row[0] if per_row else 0
            for k, n in zip(kept_t, stock[token_id]):
                while room == 0 and n > 0 and row + 1 < len(per_row):
                    row += 1
                    room = per_row[row]
                if n > room:
                    return None
                room -= n
                rows[row] -= n - k
        return rows


def placeholder_keep(input_ids: torch.Tensor, token_id: int, keeps: list[torch.Tensor], what: str = "image",
                     count: int | None = None) -> torch.Tensor:
    """``(B, L)`` bool: which tokens survive, given each item's keep mask over its placeholders.

    Items (images, videos) fill the placeholder tokens in row-major order, the order in
    which transformers scatters their features, so item ``i`` owns the placeholders with
    global ordinals ``[sum(N_<i), sum(N_<=i))``.

    Args:
        input_ids: ``(B, L)``.
        token_id: the placeholder token id.
        keeps: per item, ``(N_i,)`` bool over its stock placeholder sequence.
        count: the placeholders in ``input_ids`` where the caller knows it (:class:`PromptFacts`);
            ``None``: counted here (a device read).
    """
    ph = input_ids == token_id
    flat = torch.cat([k.to(input_ids.device) for k in keeps]) if keeps else ph.new_zeros(0)
    count = int(ph.sum()) if count is None else count
    if count != flat.numel():
        raise InvalidInputError(
            f"input_ids hold {count} {what} placeholder tokens (id {token_id}) but the {len(keeps)} {what}(s) "
            f"have {flat.numel()} features; the prompt and the pixel inputs do not match"
        )
    ordinal = (ph.flatten().long().cumsum(0) - 1).view_as(ph).clamp(min=0)
    kept = flat[ordinal] if flat.numel() else ph
    return ~ph | (ph & kept)


def item_rows(input_ids: torch.Tensor, token_id: int, lengths: list[int]) -> torch.Tensor:
    """``(n_items,)`` the batch row holding each item's placeholders."""
    ph = input_ids == token_id
    where = ph.flatten().nonzero()[:, 0]
    starts = torch.tensor([0] + lengths[:-1], device=input_ids.device).cumsum(0)
    return where[starts] // input_ids.shape[1]


def sequence_positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``(B, L)`` 1-D positions ``0, 1, ...`` over the real tokens of each row (0 at padding)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@dataclass
class Shrink:
    """Where each slot of the shortened, left-padded sequence comes from.

    Rows that keep fewer tokens than the longest one are padded on the side the batch is
    already padded on: left (the last prompt token of every row stays in the last column,
    which is what ``generate()`` reads) unless the caller padded on the right.

    Attributes:
        index: ``(B, L_red)`` column in the original sequence, ``-1`` at new padding.
        slot: ``(B, L_red)`` bool, real slots.
        padded: whether any row needed new padding.
    """

    index: torch.Tensor
    slot: torch.Tensor
    padded: bool

    @classmethod
    def from_keep(cls, keep: torch.Tensor, right: bool = False, lengths: list[int] | None = None) -> Shrink:
        """Gather index of the ``True`` columns of ``keep (B, L)``, shorter rows padded on the left
        (or on the right when ``right``: for batches the caller padded on the right).

        ``lengths``: ``keep.sum(1)`` where the caller knows it on the host (:meth:`PromptFacts.lengths`),
        so that nothing is read back; on CPU, where a read is free, it is checked.
        """
        b, n = keep.shape
        counts = keep.sum(dim=1)
        if lengths is None:
            lengths = counts.tolist()
        elif host_reads_free(keep) and counts.tolist() != lengths:
            raise RuntimeError(f"tokenreduce bug: the host-known row lengths {lengths} disagree with the keep "
                               f"mask's {counts.tolist()}")
        length = max(lengths, default=0)
        pad = length - counts
        slot_of = (0 if right else pad.unsqueeze(1)) + keep.long().cumsum(1) - 1
        # Dropped columns write to a spare slot ``length`` that is cut off.
        target = torch.where(keep, slot_of, torch.full_like(slot_of, length))
        index = torch.full((b, length + 1), -1, dtype=torch.long, device=keep.device)
        index.scatter_(1, target, torch.arange(n, device=keep.device).expand(b, n))
        index = index[:, :length]
        return cls(index=index, slot=index >= 0, padded=any(k < length for k in lengths))

    def take(self, x: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """``x[..., b, index[b]]`` along the last dim (batch on dim -2), ``fill`` at new padding."""
        idx = self.index.clamp(min=0)
        idx = idx.expand(x.shape[:-2] + idx.shape)
        out = torch.gather(x, -1, idx)
        return out.masked_fill(~self.slot.expand(out.shape), fill)

    def tokens(self, kw: dict[str, Any], pad_id: int) -> dict[str, Any]:
        """The shortened per-token inputs of a call that are not positions or masks: ``input_ids``
        (``pad_id`` at new padding), ``labels`` (-100) and token types (0; a type row shorter than
        the ids, which the stock models accept, is padded first)."""
        ids = kw["input_ids"]
        out = {"input_ids": self.take(ids, pad_id)}
        for name, fill in (("labels", -100), ("token_type_ids", 0), ("mm_token_type_ids", 0)):
            if kw.get(name) is not None:
                out[name] = self.take(torch.nn.functional.pad(kw[name], (0, ids.shape[1] - kw[name].shape[-1])), fill)
        return out

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
        text_shift: ``(B, 1)`` added to the 1-D sequence row of ``(1 + A)``-row position ids.
        rope_shift: ``(A, B, 1)`` added to caller-given ``(A, B, q)`` position ids (``A`` axes:
            3 with M-RoPE).
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
            axes = self.rope_shift.shape[0]
            kw["position_ids"] = (self.next_pos.to(device) + step).unsqueeze(0).expand(axes, batch, q)
        elif pos.dim() == 3 and pos.shape[0] == self.rope_shift.shape[0] + 1:
            kw["position_ids"] = torch.cat([pos[:1] + self.text_shift, pos[1:] + self.rope_shift], dim=0)
        elif pos.dim() == 3:
            kw["position_ids"] = pos + self.rope_shift
        else:  # (B, q) text positions: the model expands them to the three axes
            kw["position_ids"] = pos.unsqueeze(0) + self.rope_shift
        return kw


def removed_before(keep: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` how many tokens before each position were removed."""
    return (~keep).long().cumsum(dim=1)


def text_after_last(ids: torch.Tensor, embeds: torch.Tensor, is_media: torch.Tensor, valid: torch.Tensor):
    """Embeddings of the tokens after each row's last image/video token (the instruction).

    Returns ``(text (B, Q, D), mask (B, Q))``, left-aligned.
    """
    b, n = ids.shape
    pos = torch.arange(n, device=ids.device).expand(b, n)
    last = torch.where(is_media, pos, torch.full_like(pos, -1)).max(dim=1).values
    is_text = valid & ~is_media & (pos > last.unsqueeze(1))
    count = is_text.sum(dim=1)
    q = max(int(count.max()), 1)
    src = torch.sort(torch.where(is_text, pos, pos + n), dim=1).values[:, :q]
    mask = torch.arange(q, device=ids.device).unsqueeze(0) < count.unsqueeze(1)
    text = gather_rows(embeds, src.masked_fill(~mask, 0)).masked_fill(~mask.unsqueeze(-1), 0)
    return text, mask
