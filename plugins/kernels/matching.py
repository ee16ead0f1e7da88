"""VisPruner's matching rounds as one Triton kernel, one program per row.

:func:`match_rounds` runs every round of :mod:`tokenreduce_plugins.vispruner`'s diverse-token
matching on the device: the torch loop (``_match_round_dense`` / ``_match_round``) launches
several kernels a round, ~64 rounds at ``N = 576``; here a row's rounds all run in one
program, which keeps its residual list in a ``(B, W)`` buffer (the output) and loops until
the row has ``diverse`` tokens left.

A round, as the torch loop: with ``R`` tokens left, ``a`` = the list's even places
(``ceil(R/2)``), ``b`` = its odd places; each ``a`` scores ``max_j sim[a_i, b_j]``; the ``a``
are ordered by decreasing score, ties keeping their current order (a stable sort); the list
becomes ``[a in that order minus the first r, b in order]`` with ``r = min(ROUND, R - diverse,
ceil(R/2))``. In the program:

1. Each ``b`` token's entry of a ``(B, N)`` stamp buffer is set to the round number.
2. The ``a`` rows of ``sim`` are read whole (tiles of ``TILE_I`` rows by ``TILE_N``
   columns: contiguous, vectorised loads, pipelined through shared memory) and maximised
   over the columns stamped this round: the maximum of the gathered ``sim[a_i, b_j]`` (a
   set of distinct tokens), without a gather's scattered loads. NaN propagates, as in
   ``amax``. The scores go to a scratch row.
3. Each ``a``'s place in the sorted order is its rank: how many ``a`` have a higher score,
   or an equal one at an earlier place (``O(ceil(R/2)^2)`` comparisons in tiles, cheaper
   than a sort network at these sizes). Scores are compared as order-preserving int32
   keys of their bits, with ``-0.0`` keyed as ``+0.0`` (they compare equal) and NaN above
   everything, as torch's sort ranks them.
4. The list is rewritten in place: each kept ``a`` at its rank minus ``r``, then ``b``,
   then ``-1`` for the ``r`` places it shrank by. Barriers separate the phases (the list,
   stamps and scores are written and read by different threads of the program).

The result is the torch loop's list, bit for bit in the tokens it holds and their order: the
maxima and the sort are of the same float32 similarities, no arithmetic is added. (The
padded torch loop runs the batch's largest number of rounds, so a row that is done goes on
being reordered by rounds that remove nothing; its tokens, the only thing the reducer
reads, are the same.)

The wrapper allocates only from host-known shapes and never reads a device value, so a call
is capturable in a CUDA graph once compiled. It returns ``None`` where the kernel does not
apply (not float32 similarities or int64 lists, an empty shape, ``W > MAX_W``); the caller
then runs the torch loop. With ``TRITON_INTERPRET=1`` it runs on CPU tensors through
Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Widest residual list taken: the ``a`` half (``<= 4096``: their ranks, and the ``b`` half's
#: tokens) is held in registers, and a round's rank comparisons grow with its square.
MAX_W = 8192
#: Elements of ``sim`` loaded per tile (``TILE_I x TILE_N``), and of the rank comparisons
#: (``BLOCK_A x TILE_J``): many loads in flight for one program's stream of L2 reads, few
#: enough registers per thread.
_TILE_ELEMENTS = 8192
#: Warps of the one program per row.
_WARPS = 8


@triton.jit
def _order_keys(s):
    """int32 keys ordered as torch's sort orders the float32 scores ``s``.

    The scores' NaN is the kernel's own positive quiet NaN, whose bits order above +inf's:
    first in the descending order, as torch's sort puts NaN."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0 for torch's sort (CUB's radix sort too): one key
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats: larger magnitude = larger bits; flipping the 31 low bits orders them.
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _places(score_ptr, k, n_a, key, BLOCK_A: tl.constexpr, TILE_J: tl.constexpr):
    """The places of the a's ``k`` (their keys ``key``) among the ``n_a`` scores at ``score_ptr``
    in the stable descending order: how many a's come before each (a higher score, or an equal
    one at an earlier place), counted per lane and summed once."""
    tj = tl.arange(0, TILE_J)
    before = tl.zeros([BLOCK_A, TILE_J], tl.int32)
    for j0 in range(0, n_a, TILE_J):
        j = j0 + tj
        key_j = _order_keys(tl.load(score_ptr + j, mask=j < n_a, other=0.0))
        ahead = (key_j[None, :] > key[:, None]) | ((key_j[None, :] == key[:, None]) & (j[None, :] < k[:, None]))
        before += (ahead & (j < n_a)[None, :]).to(tl.int32)
    return tl.sum(before, axis=1)


@triton.jit
def match_rounds_kernel(
    sim_ptr,  # (B, N, N) float32, contiguous: cosine similarities
    list_ptr,  # (B, W) int64, in place: the residual list in its current order, -1 padded
    stamp_ptr,  # (B, N) int32 scratch, zeros: stamp[t] == round number <=> t is in this round's b
    score_ptr,  # (B, BLOCK_A) float32 scratch: this round's a scores
    rem_ptr,  # (B,) int64: tokens on each row's list
    div_ptr,  # (B,) int64: diverse tokens each row keeps
    N,
    W,
    ROUND: tl.constexpr,
    BLOCK_A: tl.constexpr,
    TILE_I: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sbase = sim_ptr + row * N * N
    lbase = list_ptr + row * W
    tbase = stamp_ptr + row * N
    cbase = score_ptr + row * BLOCK_A
    rem = tl.load(rem_ptr + row).to(tl.int32)
    div = tl.load(div_ptr + row).to(tl.int32)
    k = tl.arange(0, BLOCK_A)
    ti = tl.arange(0, TILE_I)
    tn = tl.arange(0, TILE_N)
    stamp = tl.full([], 0, tl.int32)
    while (div > 0) & (rem > div):
        stamp += 1
        n_a = (rem + 1) // 2
        n_b = rem // 2
        r = tl.minimum(tl.minimum(rem - div, n_a), ROUND)
        # 1. Stamp this round's b tokens.
        b_tok = tl.load(lbase + 2 * k + 1, mask=k < n_b, other=0)
        tl.store(tbase + b_tok, stamp, mask=k < n_b)
        tl.debug_barrier()
        # 2. Each a's best match: its whole row of sim, the columns outside b set to -inf.
        for i0 in range(0, n_a, TILE_I):
            rows = i0 + ti
            ok = rows < n_a
            a_row = sbase + tl.load(lbase + 2 * rows, mask=ok, other=0) * N
            # Elementwise maxima over the column tiles, reduced across lanes once per row tile.
            best = tl.full([TILE_I, TILE_N], float("-inf"), tl.float32)
            # Pipelined (cp.async into shared memory): the next tiles' loads are in flight
            # while one is reduced, as one program streams rows from L2.
            for c0 in tl.range(0, N, TILE_N, num_stages=3):
                cols = c0 + tn
                in_n = cols < N
                in_b = tl.load(tbase + cols, mask=in_n, other=0) == stamp
                # Masked by the bounds only (not by b), so the loads stay vectorised.
                v = tl.load(a_row[:, None] + cols[None, :], mask=ok[:, None] & in_n[None, :], other=0.0)
                v = tl.where(in_b[None, :], v, float("-inf"))
                best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)  # as amax: NaN wins
            nan = best != best
            score = tl.max(tl.where(nan, float("-inf"), best), axis=1)
            score = tl.where(tl.max(nan.to(tl.int32), axis=1) > 0, float("nan"), score)
            tl.store(cbase + rows, score, mask=ok)
        tl.debug_barrier()
        # 3. Each a's place in the stable descending order of the scores: the number of a's
        #    before it (a higher score, or an equal one at an earlier place).
        rank = _places(cbase, k, n_a, _order_keys(tl.load(cbase + k, mask=k < n_a, other=0.0)), BLOCK_A, TILE_J)
        a_tok = tl.load(lbase + 2 * k, mask=k < n_a, other=-1)
        tl.debug_barrier()  # every read of the old list is done
        # 4. [a by decreasing score minus the first r, b in order, -1 for the r places freed].
        tl.store(lbase + rank - r, a_tok, mask=(k < n_a) & (rank >= r))
        tl.store(lbase + (n_a - r) + k, b_tok, mask=k < n_b)
        tl.store(lbase + (rem - r) + k, tl.full([BLOCK_A], -1, tl.int64), mask=k < r)
        tl.debug_barrier()  # the new list, seen by every thread next round
        rem -= r


def _per_row(v: torch.Tensor | int, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(v, int):
        return torch.full((b,), v, dtype=torch.int64, device=device)
    return v.to(device=device, dtype=torch.int64).reshape(b).contiguous()


def match_rounds(
    sim: torch.Tensor,
    residual: torch.Tensor,
    remaining: torch.Tensor | int,
    diverse: torch.Tensor | int,
    round_size: int,
    *,
    tile_n: int | None = None,
) -> torch.Tensor | None:
    """Every matching round of VisPruner, for every row; ``None`` where the kernel does not apply.

    Args:
        sim: ``(B, N, N)`` float32 cosine similarities (row ``a_i``, column ``b_j`` read).
        residual: ``(B, W)`` int64 token indices in their current order, ``remaining[b]``
            of them, then -1. Not modified.
        remaining: tokens on each row's list, ``(B,)`` or one int for every row.
        diverse: tokens each row keeps, ``(B,)`` or one int; rows with ``diverse <= 0`` or
            ``remaining <= diverse`` are returned as given.
        round_size: most tokens removed per round (VisPruner's ``ROUND_SIZE``).
        tile_n: columns per tile (a power of two); default ``min(256, next_pow2(N))``.
            Tests force a small one for several tiles per row.

    Returns:
        ``(B, W)`` int64: each row's final list (``diverse`` tokens when it had more),
        then -1.
    """
    if sim.dim() != 3 or residual.dim() != 2 or sim.dtype != torch.float32 or residual.dtype != torch.int64:
        return None
    b, n, _ = sim.shape
    w = residual.shape[1]
    if b == 0 or n == 0 or w == 0 or w > MAX_W or residual.shape[0] != b:
        return None
    dev = sim.device
    out = residual.clone(memory_format=torch.contiguous_format)  # the kernel rewrites it in place
    block_a = max(2, triton.next_power_of_2((w + 1) // 2))
    tile_n = tile_n or min(256, triton.next_power_of_2(n))
    tile_i = max(1, min(block_a, _TILE_ELEMENTS // tile_n))
    tile_j = max(1, min(block_a, _TILE_ELEMENTS // block_a))
    stamps = torch.zeros((b, n), dtype=torch.int32, device=dev)
    scores = torch.empty((b, block_a), dtype=torch.float32, device=dev)
    match_rounds_kernel[(b,)](
        sim.contiguous(),
        out,
        stamps,
        scores,
        _per_row(remaining, b, dev),
        _per_row(diverse, b, dev),
        n,
        w,
        ROUND=round_size,
        BLOCK_A=block_a,
        TILE_I=tile_i,
        TILE_N=tile_n,
        TILE_J=tile_j,
        num_warps=_WARPS,
    )
    return out
