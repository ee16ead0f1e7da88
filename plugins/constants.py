"""Index tensors that depend only on a size, made once per size and device and kept.

Aranges, triangular masks, state tables: in a replayed CUDA graph each one made per call is a
kernel. They are read only (never written, never returned as an output); past the cap they
are made per call again.
"""

from __future__ import annotations

import torch

_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 256


def constant(name: str, size: int, device: torch.device, make) -> torch.Tensor:
    """The tensor ``make()`` builds for ``(name, size)`` on ``device``, made once and kept (read only)."""
    key = (name, size, torch.device(device))
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):  # an ordinary tensor, usable in and out of inference mode
            value = make()
        if len(_CONSTANTS) < _MAX_CONSTANTS:
            _CONSTANTS[key] = value
    return value


def positions(n: int, device: torch.device) -> torch.Tensor:
    """``(n,)`` long ``0 .. n-1`` (kept: :func:`constant`)."""
    return constant("arange", n, device, lambda: torch.arange(n, device=device))


__all__ = ["constant", "positions"]
