"""Shrinking token sequences consistently after encoder-side reduction.

When an image keeps ``T`` of its ``N`` features, its run of ``N`` placeholder tokens must
become ``T`` placeholders, and every per-token tensor (input ids, attention mask, labels,
position ids, token type ids) must lose the same positions, so that transformers' own
placeholder-count checks pass and the text around the image is untouched.
"""

from __future__ import annotations

import torch

from tokenreduce.errors import InvalidInputError
from tokenreduce.ops import gather_rows


def placeholder_keep(input_ids: torch.Tensor, token_id: int, keeps: list[torch.Tensor], what: str = "image") -> torch.Tensor:
    """``(B, L)`` bool: which tokens survive, given each item's keep mask over its placeholders.

    Items (images, videos) fill the placeholder tokens in row-major order, the order in
    which transformers scatters their features, so item ``i`` owns the placeholders with
    global ordinals ``[sum(N_<i), sum(N_<=i))``.

    Args:
        input_ids: ``(B, L)``.
        token_id: the placeholder token id.
        keeps: per item, ``(N_i,)`` bool over its stock placeholder sequence.
    """
    ph = input_ids == token_id
    flat = torch.cat([k.to(input_ids.device) for k in keeps]) if keeps else ph.new_zeros(0)
    if int(ph.sum()) != flat.numel():
        raise InvalidInputError(
            f"input_ids hold {int(ph.sum())} {what} placeholder tokens (id {token_id}) but the {len(keeps)} {what}(s) "
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


def shrink_plan(keep: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token of the shortened rows comes from.

    Rows that keep fewer tokens than the longest one are padded on the side the batch is
    already padded on (left unless the last column holds padding).

    Returns:
        ``(src (B, L'), slot (B, L'))``: source position of each new slot (``-1`` = pad)
        and whether it is real.
    """
    b, n = keep.shape
    counts = keep.sum(dim=1)
    length = int(counts.max()) if b else 0
    pos = torch.arange(n, device=keep.device).expand(b, n)
    right = attention_mask is not None and not bool(attention_mask[:, -1].bool().all())
    if right:
        src = torch.sort(torch.where(keep, pos, torch.full_like(pos, n)), dim=1).values[:, :length]
        src = src.masked_fill(src == n, -1)
    else:
        src = torch.sort(torch.where(keep, pos, torch.full_like(pos, -1)), dim=1).values[:, n - length :]
    return src, src >= 0


def apply_plan(x: torch.Tensor, src: torch.Tensor, slot: torch.Tensor, pad) -> torch.Tensor:
    """Gather ``x`` (sequence in the last dim, batch in the one before) by ``src``; pad slots get ``pad``."""
    lead = x.shape[:-2]
    b = src.shape[0]
    flat = x.expand(*lead, b, x.shape[-1]).reshape(-1, b, x.shape[-1])
    idx = src.clamp(min=0).unsqueeze(0).expand(flat.shape[0], -1, -1)
    out = torch.gather(flat, 2, idx)
    out = out.masked_fill(~slot.unsqueeze(0), pad)
    return out.reshape(*lead, b, src.shape[1])


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
