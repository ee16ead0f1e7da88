"""How reducers run their float32 matrix products on CUDA: TF32 tensor cores, unless told otherwise.

Reducers compute in float32 (see :mod:`tokenreduce.numerics`). Their similarity and
distance products (``(B, N, D) @ (B, D, N)`` at D = 4096) are most of their GPU time at
batch 8: in plain float32 they run on the CUDA cores (about 50 TFLOP/s on an H200), in
TF32 on the tensor cores (eight times that), still accumulating in float32. TF32 rounds the
*inputs* of a product to 10 mantissa bits: more than the bfloat16 or float16 tokens the
model hands over carry (7 or 10), so no information the tokens hold is lost; only sums can
round differently, which can resolve a near-tie between two tokens differently than a
float32 product would. The official implementations run these products in the model's own
half precision, which rounds more.

The setting applies inside reducer calls only (:meth:`tokenreduce.Reducer.__call__`), is
restored afterwards, and never touches CPU work, so CPU results (the faithfulness fixtures)
are bit-for-bit what they were. Eager and fast paths use the same setting, so they keep the
same tokens. ``configure(matmul="highest")`` (or ``TOKENREDUCE_MATMUL=highest`` in the
environment) runs them in full float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ConfigError

_MODES = ("tf32", "highest")
_mode = os.environ.get("TOKENREDUCE_MATMUL", "tf32")
if _mode not in _MODES:
    raise ConfigError(f"TOKENREDUCE_MATMUL={_mode!r} is not allowed; use one of {', '.join(_MODES)}")


def configure(*, matmul: str) -> None:
    """``matmul``: ``"tf32"`` (default: TF32 tensor cores for reducers' float32 products on CUDA) or ``"highest"``."""
    global _mode
    if matmul not in _MODES:
        raise ConfigError(f"matmul={matmul!r} is not allowed; use one of {', '.join(_MODES)}")
    _mode = matmul


def matmul_mode() -> str:
    """The current setting: ``"tf32"`` or ``"highest"``."""
    return _mode


@contextmanager
def reducer_matmul(device: torch.device) -> Iterator[None]:
    """Within the block, float32 products on ``device`` use the configured precision (CUDA only)."""
    with tf32(device, _mode == "tf32"):
        yield


@contextmanager
def tf32(device: torch.device, on: bool) -> Iterator[None]:
    """Within the block, float32 products on ``device`` run in TF32 (``on``) or full float32; CUDA only.

    Reducers use ``on=False`` for products whose result is cancelled against other terms or
    that sum features (TF32 would round their inputs to 11 significant bits).
    """
    if device.type != "cuda":
        yield
        return
    # The legacy flag: read back by torch and transformers (and tokenreduce.graphs' cache key) through
    # either API; setting the newer fp32_precision instead makes every legacy read raise.
    backend = torch.backends.cuda.matmul
    before, before_new = backend.allow_tf32, backend.fp32_precision
    backend.allow_tf32 = on
    try:
        yield
    finally:
        backend.allow_tf32 = before
        if backend.fp32_precision != before_new:  # "none" (inherit) comes back as "ieee" otherwise
            backend.fp32_precision = before_new
