"""``apet``, ``apet-llava``, ``apet-qwen``: approximation-error guided token compression.

Exact reference: ``tests/fixtures/apet/README.md`` (reproduced by ``tests/test_apet.py``).
Method page: ``docs/reducers/apet.md``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from tokenreduce import Reducer, ReducerParams, Stage, graphs, make_reduction, merge_nearest, ops
from tokenreduce.errors import InvalidInputError
from tokenreduce.numerics import safe_scale
from tokenreduce.sync import host_reads_free

from .apet_basis import select_basis

# Ridge of the published code: 1e-5 after the vision encoder, 1e-1 at the decoder layer
# (Qwen2.5-VL code; the LLaVA code uses 1e-5 at both points, see ApETLlava).
ENCODER_RIDGE = 1e-5
LLM_RIDGE = 1e-1

# The ridge solve falls back to a stronger ridge when the Gram matrix is numerically
# singular in float32 (duplicated or linearly dependent basis tokens with a ridge below
# float32 resolution): an LU pivot under _PIVOT_RTOL of the largest one marks the row,
# which is then solved with ridge max(ridge, _FALLBACK_RIDGE * max diag(Gram)).
_PIVOT_RTOL = 1e-4
_FALLBACK_RIDGE = 1e-4
# Reconstruction errors below this fraction of the token's norm are rounding noise (see
# reconstruction_errors); real features' errors are orders of magnitude above it.
_NOISE_RTOL = 2.0**-14
# Rows whose largest magnitude lies outside [1/_SAFE_PEAK, _SAFE_PEAK] are rescaled:
# squares summed over D then stay far from float32 overflow and underflow.
_SAFE_PEAK = 2.0**40
# Bounds of the ridge after scale normalisation (ridge / scale^2) in float32.
_RIDGE_MIN, _RIDGE_MAX = 1e-30, 1e30
# The CUDA formulation at large inputs (elements of (B, N, D) from this many on; host-known,
# so one shape always takes one path): the steps that read the tokens get them from products
# (FPS distances, projection errors) instead of extra passes over (B, N, D); below it, the
# extra kernels would cost more than the passes they save.
_PRODUCT_FORM_MIN = 2**23
# Squared projection errors below this fraction of the token's squared norm are rounding
# noise of the product form (about 1e-6 there, not 1e-14 as with the residual).
_PRODUCT_NOISE_RTOL = 2.0**-14


class ApETParams(ReducerParams):
    basis_tokens: int = Field(
        default=10, ge=1, description="k, the number of basis tokens; every reduced row needs 1 <= k < T."
    )
    ridge: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Ridge added to the k x k Gram matrix; None: 1e-5 at vision_encoder/projector, 1e-1 at llm_layer.",
    )
    basis_selection: Literal["fps", "dpc", "random"] = Field(
        default="fps",
        description="fps: farthest point sampling; dpc: density-peak clustering (cluster means); random: seeded.",
    )
    fps_start: Literal["first", "random"] = Field(
        default="first", description="First FPS pick: the first valid token, or a seeded random one."
    )
    seed: int = Field(default=0, ge=0, description="Seed for fps_start='random' and basis_selection='random'.")
    basis_blend: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of a basis slot's own token: slot <- (1 - w) * basis + w * token "
        "(0 replaces: LLaVA; 0.5: Qwen).",
    )
    basis_order: Literal["position", "rank"] | None = Field(
        default=None,
        description="Which basis token goes to which of the k lowest-error kept slots: 'position' (slots in "
        "ascending position) or 'rank' (slots in error rank order); None: position at the encoder stages, rank "
        "at llm_layer, as both published codes do.",
    )
    merge: Literal["nearest_cosine", "none"] = Field(
        default="nearest_cosine",
        description="nearest_cosine: average every dropped token into its most cosine-similar retained token; "
        "none: drop (the paper's ablation).",
    )
    merge_scaling: float = Field(
        default=1.0, ge=0.0, allow_inf_nan=False, description="Weight of the retained token in its merge average."
    )


class ApET(Reducer):
    """ApET: keep the tokens a few basis tokens reconstruct worst, then merge the rest.

    Ma et al., "ApET: Approximation-Error Guided Token Compression for Efficient VLMs",
    CVPR 2026 (arXiv:2602.19870; code: github.com/MaQianKun0/ApET).

    Per row: pick ``k`` basis tokens ``S`` (farthest point sampling by default);
    reconstruct every token by ridge least squares, ``C = solve(S S^T + ridge I, S x^T)^T``;
    keep the ``T`` tokens with the largest error ``|x_i - C_i S|``; put the basis tokens
    into the ``k`` lowest-error kept slots (replacing or blending); average every dropped
    token into its most cosine-similar other kept token. Needs no attention weights, so it
    runs under FlashAttention/SDPA.

    Numerics: the computation runs in float32. A row of huge or tiny magnitude is first
    divided by a power of two (exact: the results are those of the raw tokens, but the
    Gram matrix cannot overflow or underflow; the ridge is divided by its square). A
    numerically singular Gram matrix (duplicated or dependent basis tokens) is solved with
    a stronger ridge instead of returning NaN. Output features are in the input dtype.
    On CUDA, farthest point sampling ranks each step's distances from one ``torch.cdist``
    kernel (Euclidean, where the reference and the CPU path sum squares): the same picks,
    except where two squared distances differ only in their last bits. At large inputs on
    CUDA (``B * N * D >= 2^23``; 576 x 4096 tokens from batch 4 on) two steps are computed
    from products instead, so that the tokens are read once per step and nothing of their
    size is written: FPS distances as ``|x|^2 + |c|^2 - 2 x.c`` (one matrix-vector product
    per step) and the errors by projecting onto the basis orthonormalised in float64
    (``|x|^2 - |L^-1 S x|^2 - ridge |C|^2``, ``L`` the Cholesky factor of the ridged Gram
    matrix) instead of forming ``x - C S``. Both agree with the exact form up to float32
    rounding of about ``1e-6 |x|^2``: near-ties that close may resolve differently, errors
    under ``2^-7 |x|`` count as 0 (as under ``2^-14 |x|`` otherwise), and duplicates of an
    FPS pick are ranked at the rounding level rather than at 0 (a different duplicate may
    be picked; its features are the same). There, float16 and bfloat16 tokens are never
    widened to float32 (which would write and then read twice their bytes): every product
    takes them as they are with a float32 result (exact products, float32 sums:
    :func:`tokenreduce.ops.wide_bmm`), the projection splits the orthonormalised basis into
    three half-precision terms (float32's precision), and the merge sums are one-hot
    products, exact. Cosine similarities come from one product divided by the norms
    (:func:`tokenreduce.ops.cosine_similarity`), in TF32 on CUDA (:mod:`tokenreduce.precision`)
    or, for half-precision tokens, against the kept features split into two half-precision
    terms (16 significant bits for bfloat16, more than TF32's 11). At B = 8, N = 2880,
    D = 4096 in bfloat16 on an H200 these forms cut the merge product from 1.5 to 0.09 ms and
    each FPS step from 0.11 to 0.05 ms.

    ``info``: ``errors`` (B, N) reconstruction errors (0 at padded tokens and in rows kept
    whole), ``basis_indices`` (B, k) in pick order (-1 in rows kept whole), ``basis_slots``
    (B, T) output slots holding a basis token, ``assignment`` (B, N) the output slot each
    input token went to (-1: padding or dropped without merge), ``ridge`` the ridge used.
    """

    name = "apet"
    stages = frozenset(Stage)
    Params = ApETParams
    # Without a mask, one budget for all rows: no host read (sync-free form, below), so on
    # CUDA the call replays a captured graph (tokenreduce.graphs): ~250 small kernels for
    # the price of one launch, the same bits.
    graph_safe = True
    paper = "Ma et al., ApET: Approximation-Error Guided Token Compression for Efficient VLMs, CVPR 2026."

    def ridge_at(self, stage: Stage) -> float:
        """The ridge used at ``stage``."""
        if self.params.ridge is not None:
            return self.params.ridge
        return LLM_RIDGE if stage is Stage.LLM_LAYER else ENCODER_RIDGE

    def basis_order_at(self, stage: Stage) -> str:
        """How basis tokens map to the basis slots at ``stage``."""
        if self.params.basis_order is not None:
            return self.params.basis_order
        return "rank" if stage is Stage.LLM_LAYER else "position"

    def reduce(self, tokens, counts, valid, context):  # noqa: D102 - documented on Reducer
        stage = Stage(context.stage)
        k = self.params.basis_tokens
        t = context.uniform_count
        sync_free = not host_reads_free(tokens)
        if t is not None:
            # No padding, one budget for all rows: every row is reduced, and everything
            # below is decided on the host (no device read before the work is queued).
            if k >= t:
                raise _basis_count_error(k, 0, t, tokens.shape[1])
            active = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            return self._reduce(tokens, counts, valid, active, stage, t, sync_free=sync_free, dense=True)
        # Rows kept whole (budget >= valid count) or empty are not reduced at all.
        active = (counts < valid.sum(dim=1)) & (counts > 0)
        bad = active & (counts <= k)
        t = counts.max()
        dense = valid.all() & active.all() & (counts == t).all()
        t, any_bad, dense = torch.stack([t, bad.any(), dense]).tolist()  # one device read for all three
        if any_bad:
            row = int(bad.nonzero()[0, 0])
            raise _basis_count_error(k, row, int(counts[row]), int(valid[row].sum()))
        if dense:  # an all-true mask and one budget: the common case (a CUDA graph where possible)
            return graphs.reduce_uniform(self, tokens, t, replace(context, uniform_count=t))
        return self._reduce(tokens, counts, valid, active, stage, t, sync_free=sync_free)

    def _reduce(self, tokens, counts, valid, active, stage, t, *, sync_free, dense=False):
        """The algorithm. With ``sync_free`` (always on CUDA) it never reads a device value on
        the host, so it can be captured in a CUDA graph and never stalls the launch queue; it
        computes both branches of data-dependent steps instead. ``dense`` (every token valid,
        every row reduced to ``t``) skips the masking steps that are then identities: the
        same result with fewer kernels, which is most of ApET's time at small sizes."""
        p = self.params
        # The product forms at large inputs (see the class docstring) share the squared norms;
        # half-precision tokens stay in their dtype there (every product of two of them is exact
        # in float32: ops.wide_bmm), so nothing of their size is written or read in float32.
        large = ops.cuda_formulas(tokens) and tokens.numel() >= _PRODUCT_FORM_MIN
        x, scale = _normalise(tokens, None if dense else valid, sync_free, keep_half=large)
        ridge = _scaled_ridge(self.ridge_at(stage), scale)
        sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square() if large else None
        picks, basis = select_basis(
            x, valid, p.basis_tokens, method=p.basis_selection, start=p.fps_start, seed=p.seed, sq_norms=sq
        )
        errors = reconstruction_errors(x, basis, ridge, sync_free, sq_norms=sq)
        if not dense:
            errors = errors.masked_fill(~valid, 0.0)

        order, slots = ops.topk_per_row(errors, counts, valid, t)  # descending error
        indices = ops.ascending(order, slots)
        kept, basis_slots = _place_basis(
            x, order, indices, slots, counts, basis, None if dense else active, p.basis_blend, self.basis_order_at(stage)
        )
        targets = slots & ~basis_slots if p.merge == "nearest_cosine" else torch.zeros_like(slots)
        # x is float32, in range and zero at padding already (what merge_nearest's rescaling
        # would make of it, bit for bit): prescaled skips three passes over (B, N, D).
        features, sizes, assignment = merge_nearest(
            x, indices, slots, valid, targets=targets, kept_features=kept, kept_weight=p.merge_scaling, prescaled=True
        )

        work = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        features = (features.to(work) * scale.to(work).view(-1, 1, 1)).to(tokens.dtype)
        errors = _unscale(errors, scale)
        if not dense:
            # Rows kept whole return their tokens bit for bit, with empty diagnostics.
            features = torch.where(active.view(-1, 1, 1), features, ops.gather_rows(tokens, indices))
            errors = errors.masked_fill(~active.unsqueeze(1), 0.0)
            picks = picks.masked_fill(~active.unsqueeze(1), -1)
            basis_slots = basis_slots & active.unsqueeze(1)
        info = {
            "errors": errors,
            "basis_indices": picks,
            "basis_slots": basis_slots,
            "assignment": assignment,
            "ridge": self.ridge_at(stage),
        }
        return make_reduction(tokens, indices, slots, features=features, sizes=sizes, info=info)


class ApETLlavaParams(ApETParams):
    ridge: float | None = Field(
        default=ENCODER_RIDGE,
        gt=0,
        allow_inf_nan=False,
        description="Ridge added to the Gram matrix (the LLaVA code uses 1e-5 at every stage).",
    )


class ApETLlava(ApET):
    """ApET as published for LLaVA-1.5/NeXT: basis tokens replace their slots, ridge 1e-5.

    Ma et al., ApET, CVPR 2026 (LLaVA code path). Basis slots in position order after the
    vision encoder and in rank order at the decoder layer, as the published code does.
    """

    name = "apet-llava"
    Params = ApETLlavaParams


class ApETQwenParams(ApETParams):
    basis_blend: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of a basis slot's own token: slot <- (1 - w) * basis + w * token (Qwen code: 0.5).",
    )


class ApETQwen(ApET):
    """ApET as published for Qwen2.5-VL: basis tokens averaged into their slots.

    Ma et al., ApET, CVPR 2026 (Qwen2.5-VL code path). Ridge 1e-5 after the vision encoder
    and 1e-1 at the decoder layer; slots in position order after the encoder and in rank
    order at the decoder layer, as the published code does.
    """

    name = "apet-qwen"
    Params = ApETQwenParams


def _basis_count_error(k: int, row: int, t: int, n: int) -> InvalidInputError:
    return InvalidInputError(
        f"apet: basis_tokens={k} is out of range: it must satisfy 1 <= basis_tokens < T, but row {row} keeps "
        f"T={t} of its {n} valid tokens; lower basis_tokens or raise the budget"
    )


def _normalise(
    tokens: torch.Tensor, valid: torch.Tensor | None, sync_free: bool = False, keep_half: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 tokens, divided by a per-row power of two where needed, and that scale ``(B,)`` float64.

    A row whose largest magnitude lies outside ``[2^-40, 2^40]`` is divided by the power of
    two that brings it into ``[1, 2)``, so neither the Gram matrix nor the distances can
    overflow or underflow float32. Dividing by a power of two is exact, so every later step
    gives the same bits as on the raw tokens; rows in range (the usual case) are not
    touched, and without padding or scaling the input is not even copied (unless
    ``sync_free``: then the factor, 1 for rows in range, is always applied, still exactly).
    Padded tokens are zeroed; ``valid=None`` means every token is valid.

    ``keep_half``: float16 and bfloat16 tokens are returned in their own dtype, the quotient
    exact there too (a power of two divides a bfloat16 value exactly, as in float32, whose
    exponent range it shares, except into the subnormals below ``2^-126``; float16 rows never
    need a scale: their peak lies within ``[2^-24, 2^16]``).
    """
    if sync_free and valid is None and not keep_half and tokens.dtype != torch.float64:
        # The same peak, scale and quotient as below (a float64 floor(log2) of a float32 peak is
        # exact, as frexp is), from numerics.safe_scale: on CUDA two fused kernels, not about 18.
        x, scale = safe_scale(tokens, None)
        return x, scale.view(-1).double()
    wide_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    # max |x| as max(max x, -min x): one pass over the tokens in their own dtype (widening
    # is exact, and so are max and min), several times faster than an infinity norm.
    lo, hi = torch.aminmax(tokens.detach(), dim=-1)  # a power-of-two scale: no gradient flows through it
    peak = torch.maximum(hi.to(wide_dtype), lo.to(wide_dtype).neg())
    peak = (peak if valid is None else peak.masked_fill(~valid, 0)).amax(dim=1).double()
    out_of_range = (peak > _SAFE_PEAK) | ((peak < 1.0 / _SAFE_PEAK) & (peak > 0))
    exponent = torch.where(out_of_range, torch.floor(torch.log2(peak)), torch.zeros_like(peak))
    scale = torch.exp2(exponent)
    half = keep_half and tokens.dtype in (torch.float16, torch.bfloat16)
    if not sync_free and not bool(out_of_range.any()) and (valid is None or bool(valid.all())):
        return (tokens if half else tokens.float()), scale
    if half:
        divisor = scale.to(tokens.dtype).unsqueeze(1)
        if valid is not None:
            divisor = divisor / valid.to(tokens.dtype)
        return tokens / divisor.unsqueeze(-1), scale
    # One pass: dividing by the scale (a power of two: exact), by inf at padding (-> a zero
    # of the token's sign, as a product with 0 gives). The quotient widens the tokens as it
    # reads them (the same bits as widening first). Not a product with 1/scale: below
    # 2^-127 (subnormal bfloat16 rows) the inverse overflows float32.
    divisor = scale.to(wide_dtype).unsqueeze(1)
    if valid is not None:
        divisor = divisor / valid.to(wide_dtype)
    return (tokens / divisor.unsqueeze(-1)).float(), scale


def _scaled_ridge(ridge: float, scale: torch.Tensor) -> torch.Tensor:
    """The ridge for normalised tokens: ``ridge / scale^2`` (B,), clamped to a float32-safe range."""
    return (ridge / scale.square()).clamp(_RIDGE_MIN, _RIDGE_MAX).float()


def _unscale(errors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(torch.float32).max
    return (errors.double() * scale.view(-1, 1)).clamp(max=big).float()


def reconstruction_errors(
    x: torch.Tensor,
    basis: torch.Tensor,
    ridge: torch.Tensor,
    sync_free: bool = False,
    sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, N)`` errors ``|x_i - C_i S|`` of the ridge least-squares reconstruction.

    Args:
        x: ``(B, N, D)`` float32 tokens.
        basis: ``(B, k, D)`` float32 basis ``S``.
        ridge: ``(B,)`` float32 ridge per row.
        sq_norms: ``(B, N)`` squared norms of the tokens: take the product form
            (:func:`_projection_errors`; ApET's CUDA formulation at large inputs).

    ``C = solve(S S^T + ridge I, S x^T)^T`` by LU, as the reference (``torch.linalg.solve``
    is LU + triangular solves, so the bits match); rows whose Gram matrix is numerically
    singular use a stronger ridge (see ``_FALLBACK_RIDGE``). Memory: ``O(k N + N D)``.
    """
    k = basis.shape[1]
    eye = torch.eye(k, device=x.device)
    gram = basis @ basis.transpose(1, 2)
    floor = _FALLBACK_RIDGE * gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    safe_ridge = torch.maximum(ridge, floor)

    def singular_rows(lu, info):
        pivots = lu.diagonal(dim1=-2, dim2=-1).abs()
        return (info != 0) | ~(pivots.amin(dim=-1) > _PIVOT_RTOL * pivots.amax(dim=-1))

    if sq_norms is not None:
        # The same rule picks each row's ridge; the errors then need no coefficients.
        lu, _, info = torch.linalg.lu_factor_ex(gram + ridge.view(-1, 1, 1) * eye)
        used = torch.where(singular_rows(lu, info), safe_ridge, ridge)
        return _projection_errors(x, basis, used, sq_norms)
    if sync_free:
        # Both factorisations in one batched call (one kernel launch), then pick per row.
        b = gram.shape[0]
        both = gram.repeat(2, 1, 1) + torch.cat([ridge, safe_ridge]).view(-1, 1, 1) * eye
        lu, piv, info = torch.linalg.lu_factor_ex(both)
        singular = singular_rows(lu[:b], info[:b])
        lu = torch.where(singular.view(-1, 1, 1), lu[b:], lu[:b])
        piv = torch.where(singular.view(-1, 1), piv[b:], piv[:b])
    else:
        lu, piv, info = torch.linalg.lu_factor_ex(gram + ridge.view(-1, 1, 1) * eye)
        singular = singular_rows(lu, info)
        if bool(singular.any()):  # rare: pay for the second factorisation only then
            safe_lu, safe_piv, _ = torch.linalg.lu_factor_ex(gram + safe_ridge.view(-1, 1, 1) * eye)
            lu = torch.where(singular.view(-1, 1, 1), safe_lu, lu)
            piv = torch.where(singular.view(-1, 1), safe_piv, piv)
    coef = torch.linalg.lu_solve(lu, piv, basis @ x.transpose(1, 2))  # (B, k, N)
    # x - C^T S in one pass (no separate (B, N, D) reconstruction).
    residual = torch.baddbmm(x, coef.transpose(1, 2), basis, alpha=-1.0)
    errors = torch.linalg.vector_norm(residual, dim=-1)
    # An error at the rounding level of the token itself is noise: a token that the basis
    # spans (a basis as wide as the features, a duplicate) is reconstructed exactly up to
    # rounding, whose bits differ between batch shapes on CUDA. Counted as an exact zero,
    # such tokens tie and the lower index wins, the same alone and in any batch.
    floor = _NOISE_RTOL * torch.linalg.vector_norm(x, dim=-1)
    return torch.where(errors > floor, errors, torch.zeros_like(errors))


def _projection_errors(x: torch.Tensor, basis: torch.Tensor, ridge: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """The ridge reconstruction errors without forming the ``(B, N, D)`` residual.

    With ``G = S S^T + ridge I = L L^T`` (Cholesky) and ``C = G^-1 S x^T``:
    ``|x - C^T S|^2 = |x|^2 - |L^-1 S x^T|^2 - ridge |C|^2``. ``W = L^-1 S`` (rows
    orthonormal up to the ridge) is made in float64, so an ill-conditioned basis costs no
    accuracy (forming ``S x^T`` first and solving would amplify its rounding by the
    condition number); the only large product, ``W x^T``, reads the tokens once, in full
    float32. Rounding leaves about ``1e-6 |x|^2`` in the difference, so squared errors under
    ``_PRODUCT_NOISE_RTOL |x|^2`` count as 0: a spanned token (a basis token, a duplicate)
    ties at 0, the same alone and in any batch.
    """
    k = basis.shape[1]
    s = basis.double()
    ridge = ridge.double()
    eye = torch.eye(k, dtype=torch.float64, device=x.device)
    chol, _ = torch.linalg.cholesky_ex(s @ s.transpose(1, 2) + ridge.view(-1, 1, 1) * eye)
    w = torch.linalg.solve_triangular(chol, s, upper=False)  # (B, k, D)
    if x.dtype in (torch.float16, torch.bfloat16):
        z = _three_term_product(w, x)
    else:
        with ops.full_float32(x.device):
            z = (w.float() @ x.transpose(1, 2)).double()  # (B, k, N)
    coef = torch.linalg.solve_triangular(chol.transpose(1, 2), z, upper=True)
    sq = sq.double()
    e2 = sq - z.square().sum(dim=1) - ridge.view(-1, 1) * coef.square().sum(dim=1)
    keep = e2 > _PRODUCT_NOISE_RTOL * sq
    return torch.where(keep, e2, 0.0).sqrt().float()


def _three_term_product(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x^T`` ``(B, k, N)`` float64 for float64 ``w (B, k, D)`` and half-precision ``x (B, N, D)``.

    ``w``, scaled per row by a power of two to below 1, is split into three terms of ``x``'s
    dtype (24 significant bits from bfloat16, float32's precision), stacked into one product
    with ``x`` in float32 (:func:`tokenreduce.ops.wide_bmm`: exact products, one read of the
    tokens in their dtype), and the three results are added in float64.
    """
    k = w.shape[1]
    e = torch.frexp(w.abs().amax(dim=(1, 2), keepdim=True)).exponent
    rest = torch.ldexp(w, -e)
    parts = []
    for _ in range(3):
        part = rest.to(x.dtype)
        parts.append(part)
        rest = rest - part.double()
    z = ops.wide_bmm(torch.cat(parts, dim=1), x.transpose(1, 2)).double()
    return torch.ldexp(z[:, :k] + z[:, k : 2 * k] + z[:, 2 * k :], e)


def _place_basis(
    x: torch.Tensor,
    order: torch.Tensor,
    indices: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    basis: torch.Tensor,
    active: torch.Tensor | None,
    blend: float,
    basis_order: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept features ``(B, T, D)`` with the basis written into the ``k`` lowest-error kept slots.

    ``order`` holds the kept tokens by descending error; its last ``k`` real entries are
    the basis slots. ``rank``: token ``order[T-k+j]`` gets ``S[j]``; ``position``: the
    ``j``-th of those tokens in ascending position gets ``S[j]``. A slot becomes
    ``(1 - blend) * S[j] + blend * x[token]``. Returns the features and the basis-slot mask.
    ``active=None``: every row is reduced and every slot is real.
    """
    b, t = indices.shape
    k = basis.shape[1]
    n = x.shape[1]
    rank = (counts.unsqueeze(1) - k + torch.arange(k, device=x.device)).clamp(0, max(t - 1, 0))
    tokens_at = order.gather(1, rank)
    if basis_order == "position":
        tokens_at = tokens_at.sort(dim=1).values
    # Output slot of each basis token: its place among the ascending kept indices.
    key = (indices if active is None else indices.masked_fill(~slots, n)).contiguous()
    slot = torch.searchsorted(key, tokens_at.contiguous())
    if active is not None:
        slot = torch.where(active.unsqueeze(1), slot, torch.full_like(slot, t))  # spare slot t: discarded
    if blend == 0.0:  # the LLaVA variant: the basis token replaces the slot
        values = basis
    else:
        values = (1.0 - blend) * basis + blend * ops.gather_rows(x, tokens_at)

    # Float32 (the basis is, and a blend needs it): exact for half-precision tokens.
    kept = torch.cat([ops.gather_rows(x, indices).float(), x.new_zeros(b, 1, x.shape[2], dtype=torch.float32)], dim=1)
    kept.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[2]), values)
    is_basis = torch.zeros(b, t + 1, dtype=torch.bool, device=x.device)
    is_basis.scatter_(1, slot, True)
    return kept[:, :t], is_basis[:, :t]
