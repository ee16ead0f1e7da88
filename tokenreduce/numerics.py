"""Float32 work on low-precision tokens of any finite magnitude, without overflow.

Reducers compute in float32 and return the input dtype. Two things can still overflow:

* sums inside float32: bfloat16 shares float32's exponent range, so a few bfloat16
  tokens near 1e38 overflow a float32 sum, a squared norm overflows from about 1e19 on;
* the result itself: VisionZip's contextual token is a target *plus* a mean, which can
  exceed the input dtype's largest value (float16: 65504) even when computed exactly.

:func:`safe_scale` divides each row whose largest magnitude lies outside
``[2^-40, 2^40]`` by the power of two that brings it into ``[1, 2)``; dividing by a power
of two is exact, and means, cosine similarities and rankings are unchanged by it, so
rows in range (scale 1, the usual case) give the same bits as before. :func:`unscale`
multiplies back and saturates to the output dtype's finite range. Neither reads a
device value on the host.
"""

from __future__ import annotations

import torch

from . import fused

#: Rows whose largest magnitude lies in ``[1 / SAFE_PEAK, SAFE_PEAK]`` are not rescaled:
#: a sum of a million such tokens or a squared norm of 4096 of their entries stays finite
#: and normal in float32.
SAFE_PEAK = 2.0**40


def safe_scale(tokens: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, scale)``: float32 tokens divided per row by ``scale (B, 1, 1)``, a power of two.

    ``scale`` is 1 for rows whose largest valid magnitude is within ``[2^-40, 2^40]`` (or
    zero); other rows are brought to a largest magnitude in ``[1, 2)``. Padded tokens
    (``valid`` False) do not count for the scale and are zeroed. Pass ``valid=None`` when
    every token is valid (``context.uniform_count`` set): the masking pass is skipped.

    Three passes over the tokens: one reading them in their own dtype for the peak (widening
    is exact, and so are max and min), one writing the float32 quotient (widened as it is
    read: the same bits as widening first), and the masking pass if there is padding. The
    scale itself is a dozen small kernels on ``(B, N)`` and ``(B,)`` values (every one a
    launch, which on a GPU costs more than its work): the peak stays in the tokens' dtype
    until it is one value per row, and ``frexp`` gives its exponent exactly (``floor(log2)``
    of a float32 just below a power of two can round up, leaving the peak in ``[0.5, 1)``).
    On CUDA, where Triton imports (and no gradient is wanted), two fused kernels give the
    same bits (:mod:`tokenreduce.scale_kernels`).
    """
    if fused.triton_wanted(tokens) and not (tokens.requires_grad and torch.is_grad_enabled()):
        from . import scale_kernels  # imports Triton: only once a CUDA tensor asks

        done = scale_kernels.safe_scale(tokens, valid)
        if done is not None:
            return done
    # max |x| as max(max x, -min x): one reduction, no elementwise |x| copy; exact in any dtype.
    lo, hi = torch.aminmax(tokens.detach(), dim=-1)  # a power-of-two scale: no gradient flows through it
    peak = torch.maximum(hi, lo.neg())
    if valid is not None:
        peak = peak.masked_fill(~valid, 0)
    peak = peak.amax(dim=1).float()  # rounding (float64 only) is monotonic: the max of the rounded values
    # peak = m * 2^e with m in [0.5, 1), so floor(log2(peak)) = e - 1; frexp(0) gives e = 0.
    # Out of range: above 2^40, or not zero and below 2^-40 (e <= -40).
    _, e = torch.frexp(peak)
    out_of_range = (peak > SAFE_PEAK) | (e < -39)
    scale = torch.exp2((e - 1) * out_of_range).view(-1, 1, 1)
    # A division, not a product with 1/scale: 2^-127 (the inverse of the largest scale)
    # is subnormal in float32, while dividing by any power of two is exact. Half-precision
    # tokens divided by a float32 scale give a float32 quotient in one pass; wider ones are
    # narrowed first, as before.
    x = tokens / scale if tokens.dtype in (torch.bfloat16, torch.float16) else tokens.float() / scale
    if valid is not None:
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
    return x, scale


def unscale(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` in float32, saturated to the finite range of ``dtype`` (the output dtype).

    A value beyond the range (a sum that exceeds the dtype's largest value) becomes that
    largest value, with its sign, instead of ``inf``.
    """
    big = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
    return (x.float() * scale).clamp(-big, big)


__all__ = ["SAFE_PEAK", "safe_scale", "unscale"]
