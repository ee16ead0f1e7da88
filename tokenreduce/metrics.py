"""Model-free quality measures of a reduction."""

from __future__ import annotations

import torch

from .reduction import Reduction


def reconstruction_error(tokens: torch.Tensor, reduction: Reduction, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relative error of representing every input token by its nearest kept token.

    ``sum_i min_t ||x_i - y_t||^2 / sum_i ||x_i||^2`` per row over valid tokens, with
    ``y`` the reduction's output features (merged features included): 0 when nothing
    is lost, about 1 when the kept set explains nothing. Returns ``(B,)`` float32.
    Memory is ``B * N * T`` (a distance matrix), never ``N * T * D``.
    """
    x = tokens.float()
    y = reduction.tokens.float()
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    d2 = torch.cdist(x, y).square().masked_fill(~reduction.valid.unsqueeze(1), float("inf"))
    nearest = d2.min(dim=2).values.masked_fill(~valid, 0)
    total = (x.square().sum(dim=-1) * valid).sum(dim=1).clamp_min(1e-12)
    return nearest.sum(dim=1) / total
