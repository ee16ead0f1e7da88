"""Input checks shared by every reducer: shapes, masks, finiteness."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .errors import InvalidInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tokens(tokens: object, name: str = "tokens", *, finite: bool = True) -> torch.Tensor:
    """``tokens`` if they are a non-empty float ``(B, N, D)`` tensor (and, with ``finite``, finite)."""
    if not isinstance(tokens, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise InvalidInputError(f"{name} must have shape (B, N, D), got {tuple(tokens.shape)}")
    if tokens.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"{name} dtype must be one of float32/float16/bfloat16/float64, got {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[2] == 0:
        raise InvalidInputError(f"{name} has an empty batch or feature dimension: {tuple(tokens.shape)}")
    if finite:
        check_finite(tokens, name)
    return tokens


def pending_sum(tokens: torch.Tensor) -> torch.Tensor | None:
    """The finiteness check of ``tokens``, started: on CUDA their float32 sum, queued and not read
    (pass it to :func:`check_finite` once the work that follows is queued too, so the host's
    work until then overlaps the GPU's); on other devices, where a read stalls no queue, the
    check itself (``None``)."""
    if tokens.is_cuda:
        return tokens.detach().sum(dtype=torch.float32)
    check_finite(tokens)
    return None


# Inside deferred_checks(): the pending finiteness checks not read yet, ``(tokens, name, total)``.
_DEFERRED: ContextVar[list | None] = ContextVar("tokenreduce_deferred_checks", default=None)


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Within the block, a finiteness check that may wait (``deferrable``, with a queued sum) is
    collected instead of read, and all are read together by :func:`flush_checks` or at the end of
    the block (not when it raises).

    For callers that queue several steps on the GPU before they need a result on the host (the
    fast path: vision tower, reducers, decoder): each read would stop the host until the GPU
    has caught up, and expose the launches after it. Only calls whose kernels never see the
    bad values defer (a graph replay copies its tokens in with NaN and inf zeroed), so a bad
    input still raises the same :class:`InvalidInputError`, once the work before the read is queued.
    """
    pending: list = []
    token = _DEFERRED.set(pending)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
    _read(pending)  # not reached when the block raised


def flush_checks() -> None:
    """Read the checks :func:`deferred_checks` has collected so far (one device read for all)."""
    pending = _DEFERRED.get()
    if pending:
        taken = pending[:]
        pending.clear()
        _read(taken)


def _read(pending: list) -> None:
    if not pending:
        return
    totals = torch.stack([total.to(pending[0][2].device) for _, _, total in pending]).tolist()
    for (tokens, name, total), value in zip(pending, totals):
        if not math.isfinite(value):
            check_finite(tokens, name, total)


def check_finite(tokens: torch.Tensor, name: str = "tokens", total: torch.Tensor | None = None,
                 deferrable: bool = False) -> None:
    """Raise :class:`InvalidInputError` if ``tokens`` hold a NaN or an infinity.

    ``total``: their float32 sum, from :func:`pending_sum`. This runs on every call, so first one
    plain sum: any NaN or inf makes it non-finite. Only a non-finite sum (bad input, or an
    overflow of finite values) pays for the elementwise check, which is several times slower on
    CPU. The sum is read once and tested on the host (one kernel and one device read).
    ``deferrable``: the caller's kernels never see bad values, so inside :func:`deferred_checks`
    the read may wait until the block reads every check at once.
    """
    pending = _DEFERRED.get() if deferrable and total is not None and total.is_cuda else None
    if pending is not None:
        pending.append((tokens, name, total))
        return
    if total is None:
        total = tokens.detach().sum(dtype=torch.float32)
    if not math.isfinite(float(total)) and not bool(torch.isfinite(tokens).all()):
        bad = (~torch.isfinite(tokens)).nonzero()[0].tolist()
        raise InvalidInputError(
            f"{name} contains NaN or inf (first at index {tuple(bad)}); reducers require finite features"
        )


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
