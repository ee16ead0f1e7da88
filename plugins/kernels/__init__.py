"""Fused Triton kernels for the greedy selection loops (issue 19, "Reducer cost").

A greedy loop of ``T`` steps written with torch ops launches several small kernels a step;
even replayed from a CUDA graph each costs a few microseconds. Here each loop is one
Triton kernel, one program per batch row running every step on the device
(:mod:`tokenreduce_plugins.kernels.greedy`: CDPruner's and DivPrune's greedy loops; the
package's other modules serve other reducers).

:func:`fused_wanted` says whether a reducer should use them: the tensors are on CUDA,
Triton imports, and the environment variable ``TOKENREDUCE_NO_TRITON`` is unset (or
empty, or ``0``). Everything else (CPU, no Triton, the variable set) runs the torch loop: the gate is the
core's (:func:`tokenreduce.fused.triton_wanted`), shared with the core's own kernels.
Triton is imported only when a CUDA tensor asks, so CPU-only use never pays its import.
"""

from __future__ import annotations

from types import ModuleType

import torch

from tokenreduce import fused

#: Set (to anything but ``""`` or ``"0"``) to run the torch loops on CUDA too.
DISABLE_ENV = fused.DISABLE_ENV

_greedy: ModuleType | None = None
_import_failed = False


def fused_wanted(x: torch.Tensor) -> bool:
    """Whether the fused kernels should run on ``x``: CUDA, Triton importable, not disabled."""
    return fused.triton_wanted(x) and greedy_module() is not None


def greedy_module() -> ModuleType | None:
    """:mod:`tokenreduce_plugins.kernels.greedy`, or ``None`` where Triton does not import."""
    global _greedy, _import_failed
    if _greedy is None and not _import_failed:
        try:
            from . import greedy
        except ImportError:  # no Triton (CI, CPU-only installs): the torch loops serve
            _import_failed = True
        else:
            _greedy = greedy
    return _greedy
