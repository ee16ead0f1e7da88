"""Whether fused Triton kernels run: on CUDA tensors, where Triton imports, unless switched off.

A chain of small torch ops launches a kernel each; even replayed from a CUDA graph each costs
a microsecond or two of GPU time and its share of the graph's launch (issue 19, "Reducer
cost"). The core's own fused kernels (:mod:`tokenreduce.scale_kernels`) and the plugins'
(:mod:`tokenreduce_plugins.kernels`) run where :func:`triton_wanted` says so; everything
else (CPU, no Triton, the variable below set) runs the torch ops, which they equal. Triton
is imported only when a CUDA tensor asks, so CPU-only use never pays its import.
"""

from __future__ import annotations

import os

import torch

#: Set (to anything but ``""`` or ``"0"``) to run the torch ops on CUDA too.
DISABLE_ENV = "TOKENREDUCE_NO_TRITON"

_importable: bool | None = None


def triton_wanted(x: torch.Tensor) -> bool:
    """Whether fused kernels should run on ``x``: CUDA, Triton importable, not disabled.

    (The kernels have no backward: a caller whose output carries a gradient checks that too.)"""
    if not x.is_cuda or os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    return triton_importable()


def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (tried once)."""
    global _importable
    if _importable is None:
        try:
            import triton  # noqa: F401
        except ImportError:  # CI and CPU-only installs
            _importable = False
        else:
            _importable = True
    return _importable


__all__ = ["DISABLE_ENV", "triton_importable", "triton_wanted"]
