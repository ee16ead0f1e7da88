"""Input checks shared by every reducer: shapes, masks, finiteness."""

from __future__ import annotations

import math

import torch

from .errors import InvalidInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise InvalidInputError(f"{name} must have shape (B, N, D), got {tuple(tokens.shape)}")
    if tokens.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{name} dtype must be one of float32/float16/bfloat16/float64, got {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[2] == 0:
        raise InvalidInputError(f"{name} has an empty batch or feature dimension: {tuple(tokens.shape)}")
    # This runs on every call, so first one plain sum: any NaN or inf makes it non-finite.
    # Only a non-finite sum (bad input, or an overflow of finite values) pays for the
    # elementwise check, which is several times slower on CPU. The sum is read once and
    # tested on the host (one kernel and one device read, not two kernels and the read).
    if not math.isfinite(float(tokens.detach().sum(dtype=torch.float32))) and not bool(torch.isfinite(tokens).all()):
        bad = (~torch.isfinite(tokens)).nonzero()[0].tolist()
        raise InvalidInputError(
            f"{name} contains NaN or inf (first at index {tuple(bad)}); reducers require finite features"
        )
    return tokens


def check_mask(mask: object, tokens: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return a ``(B, N)`` bool validity mask on the tokens' device (all-True if ``None``)."""
    b, n, _ = tokens.shape
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"{name} must be a bool tensor of shape (B, N)=({b}, {n}), got {type(mask).__name__}")
    if tuple(mask.shape) != (b, n):
        raise InvalidInputError(f"{name} must have shape (B, N)=({b}, {n}) like tokens, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise InvalidInputError(f"{name} must be bool or integer 0/1, got dtype {mask.dtype}")
        mask = mask != 0
    return mask.to(tokens.device)
