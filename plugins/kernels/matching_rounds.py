"""VisPruner's matching rounds for uniform rows: two parallel Triton launches a round.

:mod:`tokenreduce_plugins.kernels.matching` runs every round of a row in one program: one SM
per row streams all of ``sim`` it needs (~42 MB at ``N = 576``) from L2, round after round.
Where every row holds the same ``N`` tokens and keeps the same count (the reducer's uniform
case, ``context.uniform_count``), each round's list length and size ``r`` are known on the
host (``_round_sizes``), so the rounds can be a Python loop of fixed-shape launches, each
spread over many programs:

1. :func:`score_kernel`, grid ``(B, cdiv(n_a, BLOCK_A))``: each program takes ``BLOCK_A`` of
   the ``a`` tokens (the list's even places) and gathers ``sim[a_i, b_j]`` through the list
   for every ``b`` token (its odd places), in tiles of ``TILE_B``, keeping the maximum. NaN
   propagates, as in ``amax``.
2. :func:`rebuild_kernel`, same grid: each program ranks its ``a`` tokens in the stable
   descending order of the scores (how many ``a`` score higher, or equal at an earlier
   place; scores compared as matching.py's order-preserving int32 keys: ``-0.0`` equal to
   ``+0.0``, NaN first, as torch's sort) and writes the new list ``[a by rank minus the
   first r, b in order]`` into the other of two buffers (ping-pong: no program reads what
   another writes in the same launch). The ``b`` tokens of its block go straight to their
   places ``n_a - r + j``.

The buffers keep the full width ``W``; the current length ``L`` and ``r`` are int arguments
(not specialised on, so one compiled kernel serves every round). The result is the torch
loop's (``_match_round_dense``) list, round by round: the same maxima of the same float32
similarities, the same stable order, no arithmetic added.

The wrapper allocates from host-known shapes only and never reads a device value, so a call
is capturable in a CUDA graph once compiled (tokenreduce.graphs captures every launch of the
loop). It returns ``None`` where it does not apply (not float32 similarities or int64 lists,
an empty shape, ``W > MAX_W``, CPU tensors with compiled kernels); the caller then takes
another path. With ``TRITON_INTERPRET=1`` at import the kernels run on CPU tensors through
Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .matching import _order_keys, _places

#: The reducer dispatches its uniform case here only while this is True (the one switch: set it
#: to False to send that case back to :func:`~tokenreduce_plugins.kernels.matching.match_rounds`).
ENABLED = True
#: Widest list taken (as matching.py): a round's rank comparisons grow with ``n_a`` squared.
MAX_W = 8192
#: ``a`` tokens per program: small, so a row's ~270 ``a`` at ``N = 576`` spread over ~17 SMs
#: even at batch 1.
BLOCK_A = 16
#: ``b`` tokens (score) / ``a`` tokens (rank) per tile: ``BLOCK_A x TILE`` = 2048 elements,
#: 16 per thread of 4 warps: many gathers in flight, few registers.
TILE = 128
_WARPS = 4


@triton.jit(do_not_specialize=["L"])
def score_kernel(
    sim_ptr,  # (B, N, N) float32, contiguous: cosine similarities
    list_ptr,  # (B, W) int64: the current list, L real entries
    score_ptr,  # (B, W) float32 out: score of the a at place 2i in column i
    N,
    W,
    L,
    BLOCK_A: tl.constexpr,
    TILE_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_a = (L + 1) // 2
    n_b = L // 2
    i = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    ok = i < n_a
    lbase = list_ptr + row * W
    a_tok = tl.load(lbase + 2 * i, mask=ok, other=0)
    a_row = sim_ptr + row * N * N + a_tok * N
    tb = tl.arange(0, TILE_B)
    # Elementwise maxima over the b tiles, reduced across lanes once at the end.
    best = tl.full([BLOCK_A, TILE_B], float("-inf"), tl.float32)
    for j0 in range(0, n_b, TILE_B):
        j = j0 + tb
        ok_b = j < n_b
        b_tok = tl.load(lbase + 2 * j + 1, mask=ok_b, other=0)
        v = tl.load(a_row[:, None] + b_tok[None, :], mask=ok[:, None] & ok_b[None, :], other=float("-inf"))
        best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)  # as amax: NaN wins
    # The kernel's own NaN (positive, quiet) where any was met: _order_keys puts it first.
    nan = best != best
    score = tl.max(tl.where(nan, float("-inf"), best), axis=1)
    score = tl.where(tl.max(nan.to(tl.int32), axis=1) > 0, float("nan"), score)
    tl.store(score_ptr + row * W + i, score, mask=ok)


@triton.jit(do_not_specialize=["L", "R"])
def rebuild_kernel(
    src_ptr,  # (B, W) int64: the current list, L real entries
    dst_ptr,  # (B, W) int64 out: the next list, L - R real entries (the rest untouched)
    score_ptr,  # (B, W) float32: the a scores (score_kernel)
    W,
    L,
    R,
    BLOCK_A: tl.constexpr,
    TILE_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_a = (L + 1) // 2
    n_b = L // 2
    k = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    ok = k < n_a
    cbase = score_ptr + row * W
    key = _order_keys(tl.load(cbase + k, mask=ok, other=0.0))
    # This block's places in the stable descending order of the scores.
    rank = _places(cbase, k, n_a, key, BLOCK_A, TILE_J)
    sbase = src_ptr + row * W
    dbase = dst_ptr + row * W
    a_tok = tl.load(sbase + 2 * k, mask=ok, other=-1)
    tl.store(dbase + rank - R, a_tok, mask=ok & (rank >= R))
    # The b tokens with this block's numbers (n_b <= n_a: the blocks cover them all), in order.
    ok_b = k < n_b
    b_tok = tl.load(sbase + 2 * k + 1, mask=ok_b, other=-1)
    tl.store(dbase + (n_a - R) + k, b_tok, mask=ok_b)


def match_rounds_uniform(
    sim: torch.Tensor,
    residual: torch.Tensor,
    sizes: list[int],
    *,
    block_a: int = BLOCK_A,
    tile: int = TILE,
) -> torch.Tensor | None:
    """VisPruner's matching rounds for rows that all hold a list of the same length; ``None``
    where the kernels do not apply.

    Args:
        sim: ``(B, N, N)`` float32 cosine similarities (row ``a_i``, column ``b_j`` read).
        residual: ``(B, W)`` int64 token indices in ``[0, N)``, every entry real, in their
            current order. Not modified.
        sizes: tokens removed in each round (host integers, ``_round_sizes``); each must be
            at most ``ceil(L / 2)`` of the list's length ``L`` at that round.
        block_a, tile: ``a`` tokens per program and tile width (powers of two); tests force
            small ones for several programs and tiles per row.

    Returns:
        ``(B, W - sum(sizes))`` int64: each row's final list (a view of a ``(B, W)`` buffer).
    """
    if sim.dim() != 3 or residual.dim() != 2 or sim.dtype != torch.float32 or residual.dtype != torch.int64:
        return None
    b, n, _ = sim.shape
    w = residual.shape[1]
    if b == 0 or n == 0 or w == 0 or w > MAX_W or residual.shape[0] != b or sim.shape[2] != n:
        return None
    if not sim.is_cuda and isinstance(score_kernel, JITFunction):
        return None  # compiled kernels take CUDA tensors only (imported without TRITON_INTERPRET)
    length = w
    for r in sizes:  # host integers: a round cannot drop more a's than it has (b would land before 0)
        if not 0 <= r <= (length + 1) // 2:
            raise ValueError(f"sizes: a round of a {length}-token list removes 0..{(length + 1) // 2}, got {r}")
        length -= r
    dev = sim.device
    sim = sim.contiguous()
    bufs = (residual.clone(memory_format=torch.contiguous_format), torch.empty((b, w), dtype=torch.int64, device=dev))
    scores = torch.empty((b, w), dtype=torch.float32, device=dev)
    tile_j = max(1, min(tile, triton.next_power_of_2((w + 1) // 2)))
    length = w
    # A Python loop over the host-known rounds, never reading the device: each launch is
    # captured by the reducer's CUDA graph.
    for step, r in enumerate(sizes):
        if length == 0:  # an emptied list stays empty (no launch over an empty grid)
            break
        src, dst = bufs[step % 2], bufs[(step + 1) % 2]
        grid = (b, triton.cdiv((length + 1) // 2, block_a))
        score_kernel[grid](sim, src, scores, n, w, length, BLOCK_A=block_a, TILE_B=tile, num_warps=_WARPS)
        rebuild_kernel[grid](src, dst, scores, w, length, r, BLOCK_A=block_a, TILE_J=tile_j, num_warps=_WARPS)
        length -= r
    return bufs[len(sizes) % 2][:, :length]
