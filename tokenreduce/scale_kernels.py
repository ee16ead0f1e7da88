"""Triton form of :func:`tokenreduce.numerics.safe_scale`: two kernels instead of about a dozen.

The torch form launches a reduction for the peak, then a chain of small kernels on ``(B, N)``
and ``(B,)`` values for the scale, then the division. Here:

1. :func:`_peak_kernel`: each program takes a chunk of one row's ``N * D`` values and writes
   the largest magnitude among its valid tokens (float32, exact: widening and ``max`` are);
2. :func:`_divide_kernel`: each program reduces its row's chunk maxima to the peak, derives
   the scale from the peak's float32 bits (exact, subnormal peaks included), and writes its
   chunk of the quotient, ``0`` at padded tokens; the first program of a row writes the scale.

Equal to the torch form bit for bit on finite tokens (a row's scale and every quotient: the
division is IEEE round-to-nearest, ``div_rn``), which tests/test_fused_scale.py checks. Tokens
are finite here: every reducer call checks its tokens, and graph replays zero non-finite
values on the way in. (On NaN the two differ: the torch peak is NaN and the scale 1, here
NaN does not count.) The wrapper reads no device value, so a CUDA graph captures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements a program handles per step, and steps per program (a chunk of 8192 values).
BLOCK = 1024
STEPS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _peak_kernel(
    x_ptr,
    valid_ptr,
    part_ptr,
    n,
    row_elems,
    d,
    parts,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    peak = tl.zeros([BLOCK], tl.float32)
    for step in range(STEPS):
        offs = (chunk * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        m = offs < row_elems
        if HAS_VALID:
            ok = tl.load(valid_ptr + row * n + offs // d, mask=m, other=0)
            m = m & (ok != 0)
        v = tl.load(x_ptr + row * row_elems + offs, mask=m, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(v))
    tl.store(part_ptr + row * parts + chunk, tl.max(peak, axis=0))


@triton.jit
def _divide_kernel(
    x_ptr,
    valid_ptr,
    part_ptr,
    out_ptr,
    scale_ptr,
    n,
    row_elems,
    d,
    parts,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
    PARTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    p = tl.arange(0, PARTS)
    peak = tl.max(tl.load(part_ptr + row * parts + p, mask=p < parts, other=0.0), axis=0)
    # floor(log2(peak)) from the exponent bits; a subnormal peak is first multiplied by 2^64 (exact).
    subnormal = peak < 1.1754943508222875e-38
    lifted = tl.where(subnormal, peak * 18446744073709551616.0, peak)
    k = ((lifted.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - tl.where(subnormal, 64, 0)
    # Out of range: above 2^40, or not zero and below 2^-40 (numerics.SAFE_PEAK).
    out_of_range = (peak > 1099511627776.0) | ((peak > 0.0) & (peak < 9.094947017729282e-13))
    # 2^k as float32 bits: normal from k = -126 on, else the subnormal 2^(k + 149) ulps.
    bits = tl.where(k >= -126, tl.maximum(k + 127, 0) << 23, 1 << tl.minimum(tl.maximum(k + 149, 0), 22))
    scale = tl.where(out_of_range, bits.to(tl.float32, bitcast=True), 1.0)
    if chunk == 0:
        tl.store(scale_ptr + row, scale)
    for step in range(STEPS):
        offs = (chunk * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        m = offs < row_elems
        v = tl.load(x_ptr + row * row_elems + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.div_rn(v, scale)
        if HAS_VALID:
            ok = tl.load(valid_ptr + row * n + offs // d, mask=m, other=0)
            q = tl.where(ok != 0, q, 0.0)
        tl.store(out_ptr + row * row_elems + offs, q, mask=m)


def safe_scale(tokens: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, scale)`` as :func:`tokenreduce.numerics.safe_scale` gives them, or ``None`` where these
    kernels do not apply (another dtype or layout, an empty or too large a shape): the caller
    then runs the torch form."""
    if tokens.dim() != 3 or tokens.dtype not in _DTYPES or not tokens.is_contiguous() or tokens.numel() == 0:
        return None
    b, n, d = tokens.shape
    row_elems = n * d
    parts = triton.cdiv(row_elems, BLOCK * STEPS)
    if row_elems >= 2**31 or parts > 4096:
        return None
    if valid is not None:
        if valid.shape != (b, n) or valid.device != tokens.device:
            return None
        valid = valid.contiguous().view(torch.uint8)
    part = torch.empty(b, parts, dtype=torch.float32, device=tokens.device)
    x = torch.empty(b, n, d, dtype=torch.float32, device=tokens.device)
    scale = torch.empty(b, 1, 1, dtype=torch.float32, device=tokens.device)
    mask = valid if valid is not None else tokens  # an unread pointer where there is no mask
    grid = (b, parts)
    common = {"HAS_VALID": valid is not None, "BLOCK": BLOCK, "STEPS": STEPS}
    _peak_kernel[grid](tokens, mask, part, n, row_elems, d, parts, **common)
    wide = triton.next_power_of_2(parts)
    _divide_kernel[grid](tokens, mask, part, x, scale, n, row_elems, d, parts, PARTS=wide, **common)
    return x, scale


__all__ = ["safe_scale"]
