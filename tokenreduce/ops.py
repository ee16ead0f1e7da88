"""Batched tensor building blocks shared by reducers. No Python loops over rows or tokens.

Conventions: ``valid`` is a ``(B, N)`` bool mask of real input tokens; ``counts`` is
``(B,)`` int64, the number of tokens each row keeps; kept-slot tensors are ``(B, T)``
with ``T = counts.max()`` and padded slots at the end of each row.
"""

from __future__ import annotations

import torch

# Cosine similarity of a zero vector is defined as 0 (not NaN): its norm is clamped.
_NORM_EPS = 1e-12


def slot_mask(counts: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """``(B, T)`` bool: the first ``counts[b]`` slots of each row are real."""
    t = int(counts.max()) if t is None else t
    return torch.arange(t, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


def topk_per_row(
    scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``counts[b]`` highest scores of each row, over valid tokens only.

    Returns ``(order, slots)``: ``order`` is ``(B, T)`` in descending score order
    (ties broken by lower index, as ``torch.topk`` on CPU/CUDA does not guarantee, so
    we sort stably), padded with ``-1``; ``slots`` marks the real entries. Pass ``t``
    (``= counts.max()``) when it is known on the host, to avoid a device sync.
    """
    t = int(counts.max()) if t is None else t
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~valid, neg_inf)
    # A stable descending sort gives a documented tie rule (lower index first).
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :t]
    slots = slot_mask(counts, t)
    return order.masked_fill(~slots, -1), slots


def ascending(indices: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Sort the real entries of each row ascending, keeping ``-1`` padding at the end."""
    big = torch.iinfo(torch.long).max
    key = indices.masked_fill(~slots, big)
    out = torch.sort(key, dim=1).values
    return out.masked_fill(~slots, -1)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for ``x`` of shape ``(B, N, ...)``; ``-1`` entries read row 0 (mask them)."""
    idx = indices.clamp(min=0)
    shape = idx.shape + x.shape[2:]
    idx = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(shape)
    return torch.gather(x, 1, idx)


def keep_mask_from(indices: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, N)`` bool mask of the positions listed in the real slots of ``indices``."""
    mask = torch.zeros(indices.shape[0], n + 1, dtype=torch.bool, device=indices.device)
    # Padded slots write to a spare column n that is cut off afterwards.
    target = torch.where(slots, indices, torch.full_like(indices, n))
    mask.scatter_(1, target, True)
    return mask[:, :n]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last dim in float32; zero vectors stay zero."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, M, K)`` cosine similarities of ``a (B, M, D)`` and ``b (B, K, D)`` in float32."""
    return normalize(a) @ normalize(b).transpose(1, 2)


def merge_into(
    tokens: torch.Tensor,
    target: torch.Tensor,
    t: int,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of tokens grouped by target slot.

    Args:
        tokens: ``(B, N, D)`` float32 features.
        target: ``(B, N)`` slot in ``[0, t)`` each token is added to, or ``-1`` for none.
        t: number of slots.
        token_weight: ``(B, N)`` float32 weight of each token in its slot's sum (``None``: 1).

    Returns:
        ``(sums (B, t, D), weights (B, t))``; the caller divides.
    """
    b, n, d = tokens.shape
    keep = target >= 0
    w = keep.to(tokens.dtype) if token_weight is None else token_weight * keep
    if tokens.is_cuda:
        # scatter_add_ uses atomics on CUDA, whose summation order (and so the last bits)
        # varies between runs; a one-hot matmul is deterministic. Memory B*t*N, not N*t*D.
        onehot = (target.unsqueeze(1) == torch.arange(t, device=target.device).view(1, t, 1)).to(tokens.dtype)
        onehot = onehot * w.unsqueeze(1)
        return torch.bmm(onehot, tokens), onehot.sum(dim=2)
    # Tokens without a target go to a spare slot t, dropped afterwards (so unit weights
    # need no (B, N, D) product). index_add_ over flattened rows adds whole D-vectors
    # (several times faster than scatter_add_ with an expanded index, same order and bits).
    tgt = torch.where(keep, target, torch.full_like(target, t))
    src = tokens if token_weight is None else tokens * w.unsqueeze(-1)
    flat = (tgt + (t + 1) * torch.arange(b, device=tokens.device).unsqueeze(1)).reshape(-1)
    sums = torch.zeros(b * (t + 1), d, dtype=tokens.dtype, device=tokens.device)
    sums = sums.index_add_(0, flat, src.reshape(b * n, d)).view(b, t + 1, d)
    weights = torch.zeros(b, t + 1, dtype=tokens.dtype, device=tokens.device)
    weights.scatter_add_(1, tgt, w)
    return sums[:, :t], weights[:, :t]
