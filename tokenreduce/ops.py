"""Batched tensor building blocks shared by reducers. No Python loops over rows or tokens.

Conventions: ``valid`` is a ``(B, N)`` bool mask of real input tokens; ``counts`` is
``(B,)`` int64, the number of tokens each row keeps; kept-slot tensors are ``(B, T)``
with ``T = counts.max()`` and padded slots at the end of each row.

CUDA formulations (:func:`cuda_formulas`): a few ops compute the same quantity differently
on CUDA, where the CPU form costs extra passes over ``(B, N, D)`` (about 40 us each at
B = 8, N = 576, D = 4096 in float32) or a kernel that is not a GEMM: cosine similarities
from one product divided by the norms, Euclidean distances through a product. They agree
with the CPU form up to float32 rounding (so a near-tie can resolve differently); the CPU
form, which the faithfulness fixtures check, is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from . import precision

# Cosine similarity of a zero vector is defined as 0 (not NaN): its norm is clamped.
_NORM_EPS = 1e-12

_EMULATE_CUDA: ContextVar[bool] = ContextVar("tokenreduce_emulate_cuda_formulas", default=False)


def cuda_formulas(x: torch.Tensor) -> bool:
    """Whether work on ``x`` takes the CUDA formulations: on CUDA, and on CPU inside :func:`emulate_cuda_formulas`."""
    return x.is_cuda or _EMULATE_CUDA.get()


@contextmanager
def emulate_cuda_formulas() -> Iterator[None]:
    """Within the block, CPU tensors take the CUDA formulations (for tests and cost counts without a GPU).

    Unlike :func:`tokenreduce.sync.no_host_sync` (the same results bit for bit, with host
    reads refused) this changes results in their last bits, as CUDA does.
    """
    token = _EMULATE_CUDA.set(True)
    try:
        yield
    finally:
        _EMULATE_CUDA.reset(token)


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Float32 products in full float32 (no TF32) within the block, on CUDA.

    For products whose result is cancelled against other terms (distances as
    ``|x|^2 + |y|^2 - 2 x.y``, residual norms) or that sum features: TF32 rounds their
    inputs to 11 significant bits, far too coarse there. Such products are memory-bound or
    small, so full float32 costs little.
    """
    with precision.tf32(device, False):
        yield


def wide_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) as float32, each product exact and summed in float32.

    Half-precision inputs (both float16 or both bfloat16) are multiplied on CUDA as they are,
    with a float32 result (``out_dtype``): every product of two half values is exact in
    float32, so this is the float32 product of the widened inputs up to the order of the
    sums, reading half the bytes and on the tensor cores. Other inputs, and CPU (which has
    no such kernel), take the widened inputs' product in full float32 (no TF32).
    """
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    with full_float32(a.device):
        return torch.bmm(a.float(), b.float())


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x^T`` over the last two dims of ``x (..., M, K)``, in full float32 (no TF32).

    CUDA formulation: with few matrices of few rows and many features (fewer than 64
    matrices, ``M <= 64``, ``K >= 1024``), the product is split along the features into blocks
    of 256 whose products are summed. cuBLAS's float32 kernels give such a shape one tile per
    matrix that walks all ``K``, on a few of the GPU's streaming multiprocessors (profiled on an
    H200: PruneVid's two such products at B = 1, 16 x 36 x 36 x 4096, took 0.16 ms of its 0.69 ms
    of GPU time); the blocks make it many short tiles. The same sums in another order. From 64
    matrices on, one tile per matrix already fills the GPU, and the split's copy of ``x`` into
    blocks (its size in bytes, read and written) costs more than it saves: one product, as on CPU.
    """
    m, k = x.shape[-2], x.shape[-1]
    with full_float32(x.device):
        if cuda_formulas(x) and m <= 64 and k >= 1024 and k % 256 == 0 and x.numel() < 64 * m * k:
            blocks = k // 256
            # One copy into (P * blocks, M, 256); the product then reads its transpose by strides.
            parts = x.reshape(-1, m, blocks, 256).transpose(1, 2).reshape(-1, m, 256)
            grams = torch.bmm(parts, parts.transpose(1, 2)).view(-1, blocks, m, m)
            return grams.sum(dim=1).view(*x.shape[:-1], m)
        return torch.matmul(x, x.transpose(-1, -2))


def _split_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` ``(B, M, K)`` float32 for half-precision ``a (B, M, D)`` and ``b (B, K, D)``.

    ``b`` (any float dtype, within ``a``'s range) is split into ``hi + lo``, both in ``a``'s
    dtype: 16 significant bits from bfloat16, more than TF32's 11, and ``a`` is read once, in
    its own dtype, by one product with both (:func:`wide_bmm`).
    """
    k = b.shape[1]
    hi = b.to(a.dtype)
    lo = (b.float() - hi.float()).to(a.dtype)
    both = wide_bmm(a, torch.cat([hi, lo], dim=1).transpose(1, 2))
    return both[..., :k] + both[..., k:]


def slot_mask(counts: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """``(B, T)`` bool: the first ``counts[b]`` slots of each row are real."""
    t = int(counts.max()) if t is None else t
    return torch.arange(t, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


def topk_per_row(
    scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``counts[b]`` highest scores of each row, over valid tokens only.

    Returns ``(order, slots)``: ``order`` is ``(B, T)`` in descending score order
    (ties broken by lower index, as ``torch.topk`` on CPU/CUDA does not guarantee, so
    we sort stably), padded with ``-1``; ``slots`` marks the real entries. Pass ``t``
    (``= counts.max()``) when it is known on the host, to avoid a device sync.
    """
    t = int(counts.max()) if t is None else t
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~valid, neg_inf)
    # A stable descending sort gives a documented tie rule (lower index first).
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :t]
    slots = slot_mask(counts, t)
    return order.masked_fill(~slots, -1), slots


def ascending(indices: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Sort the real entries of each row ascending, keeping ``-1`` padding at the end."""
    big = torch.iinfo(torch.long).max
    key = indices.masked_fill(~slots, big)
    out = torch.sort(key, dim=1).values
    return out.masked_fill(~slots, -1)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for ``x`` of shape ``(B, N, ...)``; ``-1`` entries read row 0 (mask them)."""
    idx = indices.clamp(min=0)
    shape = idx.shape + x.shape[2:]
    idx = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(shape)
    return torch.gather(x, 1, idx)


def keep_mask_from(indices: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, N)`` bool mask of the positions listed in the real slots of ``indices``."""
    mask = torch.zeros(indices.shape[0], n + 1, dtype=torch.bool, device=indices.device)
    # Padded slots write to a spare column n that is cut off afterwards.
    target = torch.where(slots, indices, torch.full_like(indices, n))
    mask.scatter_(1, target, True)
    return mask[:, :n]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last dim in float32; zero vectors stay zero."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, M, K)`` cosine similarities of ``a (B, M, D)`` and ``b (B, K, D)`` in float32.

    CPU: the product of the unit-normalised inputs. CUDA formulation: the product of the
    inputs, divided by both norms afterwards: the inputs are read for their norms but never
    rewritten normalised (two passes over ``(B, M, D)`` and ``(B, K, D)`` fewer; the
    ``(B, M, K)`` result is much smaller at D = 4096). The same values up to rounding; a
    zero vector still has similarity 0. Where the product would run in TF32, a
    half-precision ``a`` (the larger operand) is never widened: ``b`` is split into two
    terms of its dtype and multiplied with it in float32 (:func:`_split_product`, more
    precise than TF32; ``b`` must lie within that dtype's range).
    """
    if cuda_formulas(a):
        norm_a = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32).clamp_min(_NORM_EPS)
        norm_b = torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32).clamp_min(_NORM_EPS)
        # Where float32 products are rounded anyway (TF32: on CUDA unless full float32 is
        # asked for; the CPU emulation takes this form too).
        rounded = not a.is_cuda or torch.backends.cuda.matmul.allow_tf32
        if rounded and a.dtype in (torch.float16, torch.bfloat16) and a.shape[1] > b.shape[1]:
            product = _split_product(a, b)
        else:
            product = a.float() @ b.float().transpose(1, 2)
        return product.div_(norm_a.unsqueeze(2)).div_(norm_b.unsqueeze(1))
    return normalize(a) @ normalize(b).transpose(1, 2)


def euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """``(B, M, M)`` float32 Euclidean distances between the rows of ``x (B, M, D)``.

    CPU: ``torch.cdist`` computing each difference directly (exact zeros for duplicates).
    CUDA formulation: ``|u_i|^2 + |u_j|^2 - 2 u_i.u_j`` from one full-float32 product, with
    ``u`` the rows minus their mean (distances do not change under a translation, and a
    component every row shares, such as a decoder's massive activations, would otherwise
    dominate the norms and the rounding), clamped at 0; the diagonal is exactly 0 and
    duplicates come out at the rounding level. ``cdist``'s direct kernel is no GEMM: at
    B = 8, M = 173, D = 4096 it takes 0.9 ms on an H200, the product a few dozen us.
    """
    x = x.float()
    if not cuda_formulas(x):
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    u = x - x.mean(dim=1, keepdim=True)
    with full_float32(x.device):
        gram = u @ u.transpose(1, 2)
    sq = gram.diagonal(dim1=1, dim2=2)
    # (a + a) - 2a is exactly 0: the diagonal needs no mask.
    return (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * gram).clamp_min_(0.0).sqrt_()


def merge_into(
    tokens: torch.Tensor,
    target: torch.Tensor,
    t: int,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of tokens grouped by target slot.

    Args:
        tokens: ``(B, N, D)`` float32 features.
        target: ``(B, N)`` slot in ``[0, t)`` each token is added to, or ``-1`` for none.
        t: number of slots.
        token_weight: ``(B, N)`` float32 weight of each token in its slot's sum (``None``: 1).

    Returns:
        ``(sums (B, t, D), weights (B, t))``; the caller divides.
    """
    b, n, d = tokens.shape
    keep = target >= 0
    if cuda_formulas(tokens):
        # scatter_add_ uses atomics on CUDA, whose summation order (and so the last bits)
        # varies between runs; a one-hot matmul is deterministic. Memory B*t*N, not N*t*D.
        # Half-precision tokens with unit weights stay in their dtype: a product with 0 or 1
        # is exact, and wide_bmm sums in float32 (at B=8, N=2880, D=4096: 0.09 ms on an
        # H200, against 1.5 ms for the float32 product). Weighted sums need float32 tokens.
        if token_weight is not None or tokens.dtype not in (torch.float16, torch.bfloat16):
            tokens = tokens.float()
        onehot = (target.unsqueeze(1) == torch.arange(t, device=target.device).view(1, t, 1)).to(tokens.dtype)
        if token_weight is not None:  # (tokens without a target match no slot: unit weights need no mask)
            onehot = onehot * (token_weight * keep).unsqueeze(1)
        return wide_bmm(onehot, tokens), onehot.sum(dim=2, dtype=torch.float32)
    w = keep.to(tokens.dtype) if token_weight is None else token_weight * keep
    # Tokens without a target go to a spare slot t, dropped afterwards (so unit weights
    # need no (B, N, D) product). index_add_ over flattened rows adds whole D-vectors
    # (several times faster than scatter_add_ with an expanded index, same order and bits).
    tgt = torch.where(keep, target, torch.full_like(target, t))
    src = tokens if token_weight is None else tokens * w.unsqueeze(-1)
    flat = (tgt + (t + 1) * torch.arange(b, device=tokens.device).unsqueeze(1)).reshape(-1)
    sums = torch.zeros(b * (t + 1), d, dtype=tokens.dtype, device=tokens.device)
    sums = sums.index_add_(0, flat, src.reshape(b * n, d)).view(b, t + 1, d)
    weights = torch.zeros(b, t + 1, dtype=tokens.dtype, device=tokens.device)
    weights.scatter_add_(1, tgt, w)
    return sums[:, :t], weights[:, :t]
