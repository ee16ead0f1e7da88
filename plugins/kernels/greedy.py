"""Triton kernels running a whole greedy selection loop on the device, one program per row.

* :func:`greedy_map_fused`: CDPruner's fast greedy MAP of a DPP
  (:func:`tokenreduce_plugins.cdpruner.greedy_map`, step for step).
* :func:`max_min_fused`: DivPrune's greedy max-min loop
  (:func:`tokenreduce_plugins.divprune.max_min_select`, after its first pick).

Each program walks its row's ``N`` columns in tiles of ``TILE_N`` (one tile up to
``N = 2048`` or ``4096``), so any ``N`` up to :data:`MAX_N` works; per-row state that must
outlive a tile (CDPruner's ``d^2`` and availability, DivPrune's scores) lives in scratch
buffers the wrappers allocate, as do CDPruner's Cholesky rows ``c`` (``(T, N)`` per row).
A barrier ends each step, so the next step's threads see every value written in it.

The wrappers allocate only from host-known shapes and never read a device value, so a
call can be captured in a CUDA graph once compiled (the first call compiles). They return
``None`` where the kernels do not apply (not float32, an empty shape, ``N > MAX_N``); the
callers then run their torch loops. With ``TRITON_INTERPRET=1`` they run on CPU tensors
through Triton's interpreter (the tests).

Numerics: every elementwise operation is the torch loop's, in the same precision, with
IEEE division and square root and no fused multiply-adds; only the order of CDPruner's
sum over earlier picks differs (chunks of ``KC`` picks, a tree within a chunk), so a
near-tie between two tokens' ``d^2`` may resolve differently. DivPrune's loop (minimum,
argmax) is exact: its picks equal the torch loop's bit for bit.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import triton
import triton.language as tl

from tokenreduce import ops

#: Largest ``N`` the kernels take: offsets within a row's ``(T, N)`` scratch are 32-bit
#: (``T <= N``, so ``N^2`` must stay below ``2^31``); row and batch offsets are 64-bit.
MAX_N = 32768
_FLT_MAX = torch.finfo(torch.float32).max


@triton.jit
def _best_of_tile(score, raw, offs, base, best_s, best_j, best_d):
    """Fold one tile's maximum into the running (score, index, raw value) of the row.

    ``offs``: the tile's lane numbers, ``base``: its first column. Within a tile the lowest
    index wins ties; across tiles an earlier one keeps them (strict ``>``). The first tile
    always sets the result, so a row without any candidate (every score ``-inf``) gets
    index 0 and its raw value, as torch's argmax does.
    """
    s, jt = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
    d = tl.sum(tl.where(offs == jt, raw, 0.0), axis=0)  # raw[jt], NaN or inf included
    take = (s > best_s) | (base == 0)
    return tl.where(take, s, best_s), tl.where(take, base + jt, best_j), tl.where(take, d, best_d)


@triton.jit
def _map_score(d2, avail, FLOOR: tl.constexpr, FMAX: tl.constexpr):
    """``where(available, nan_to_num(d2, nan=FLOOR, neginf=FLOOR), -inf)`` (posinf -> FMAX, as torch)."""
    s = tl.where(d2 != d2, FLOOR, d2)
    s = tl.where(s == float("-inf"), FLOOR, s)
    s = tl.where(s == float("inf"), FMAX, s)
    return tl.where(avail, s, float("-inf"))


@triton.jit
def greedy_map_kernel(
    kernel_ptr,  # (B, N, N) float32, contiguous: L
    valid_ptr,  # (B, N) bool
    cis_ptr,  # (B, T, N) float32 scratch: Cholesky rows c_0 .. c_{T-1}
    d2_ptr,  # (B, N) float32 scratch: conditional variances d^2
    avail_ptr,  # (B, N) int8 scratch: not yet picked and valid
    picks_ptr,  # (B, T) int64 out
    N,
    T,
    FLOOR: tl.constexpr,
    FMAX: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_TILES: tl.constexpr,
    KC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kbase = kernel_ptr + b * N * N
    cbase = cis_ptr + b * T * N
    d2base = d2_ptr + b * N
    abase = avail_ptr + b * N
    offs = tl.arange(0, TILE_N)
    # d^2 starts as diag(L), availability as the validity; the first pick is their argmax.
    best_s = tl.full([], float("-inf"), tl.float32)
    best_j = tl.full([], 0, tl.int32)
    best_d = tl.full([], 0.0, tl.float32)
    for tile in range(NUM_TILES):
        cols = tile * TILE_N + offs
        m = cols < N
        d2 = tl.load(kbase + cols.to(tl.int64) * (N + 1), mask=m, other=0.0)
        av = (tl.load(valid_ptr + b * N + cols, mask=m, other=0) != 0) & m
        tl.store(d2base + cols, d2, mask=m)
        tl.store(abase + cols, av.to(tl.int8), mask=m)
        best_s, best_j, best_d = _best_of_tile(
            _map_score(d2, av, FLOOR, FMAX), d2, offs, tile * TILE_N, best_s, best_j, best_d
        )
    tl.debug_barrier()
    for i in range(T):
        j = best_j
        tl.store(picks_ptr + b * T + i, j.to(tl.int64))
        ok = best_d > 0  # as the torch loop: a non-positive (or NaN) d^2 writes a zero row of c
        root = tl.sqrt_rn(tl.where(ok, best_d, 1.0))
        jrow = kbase + j.to(tl.int64) * N
        best_s = tl.full([], float("-inf"), tl.float32)
        best_j = tl.full([], 0, tl.int32)
        best_d = tl.full([], 0.0, tl.float32)
        for tile in range(NUM_TILES):
            cols = tile * TILE_N + offs
            m = cols < N
            num = tl.load(jrow + cols, mask=m, other=0.0)  # L[j, :]
            # sum_{k < i} c_k[j] * c_k[:], KC earlier rows at a time (masked rows add 0 * 0).
            acc = tl.zeros([TILE_N], tl.float32)
            for k0 in range(0, i, KC):
                ks = k0 + tl.arange(0, KC)
                km = ks < i
                krow = cbase + ks.to(tl.int64) * N
                cj = tl.load(krow + j, mask=km, other=0.0)
                ck = tl.load(krow[:, None] + cols[None, :], mask=km[:, None] & m[None, :], other=0.0)
                acc += tl.sum(cj[:, None] * ck, axis=0)
            e = tl.where(ok, tl.div_rn(num - acc, root), 0.0)
            tl.store(cbase + i * N + cols, e, mask=m)
            d2 = tl.load(d2base + cols, mask=m, other=0.0) - e * e
            tl.store(d2base + cols, d2, mask=m)
            av = (tl.load(abase + cols, mask=m, other=0) != 0) & m & (cols != j)
            tl.store(abase + cols, av.to(tl.int8), mask=m)
            best_s, best_j, best_d = _best_of_tile(
                _map_score(d2, av, FLOOR, FMAX), d2, offs, tile * TILE_N, best_s, best_j, best_d
            )
        tl.debug_barrier()  # this step's c row, d^2 and availability, seen by every thread next step


@triton.jit
def max_min_kernel(
    dist_ptr,  # (B, N, N) float32, contiguous: distances, -inf on the diagonal
    first_ptr,  # (B,) int64: the first pick
    score_ptr,  # (B, N) float32, updated in place: distance to the nearest pick
    picks_ptr,  # (B, T) int64 out
    N,
    T,
    TILE_N: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dbase = dist_ptr + b * N * N
    sbase = score_ptr + b * N
    offs = tl.arange(0, TILE_N)
    pick = tl.load(first_ptr + b).to(tl.int32)
    tl.store(picks_ptr + b * T, pick.to(tl.int64))
    for i in range(1, T):
        prow = dbase + pick.to(tl.int64) * N
        best_s = tl.full([], float("-inf"), tl.float32)
        best_j = tl.full([], 0, tl.int32)
        for tile in range(NUM_TILES):
            cols = tile * TILE_N + offs
            m = cols < N
            s = tl.minimum(tl.load(sbase + cols, mask=m, other=float("-inf")), tl.load(prow + cols, mask=m, other=0.0))
            tl.store(sbase + cols, s, mask=m)
            sm, jt = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
            take = (sm > best_s) | (tile == 0)
            best_s = tl.where(take, sm, best_s)
            best_j = tl.where(take, jt + tile * TILE_N, best_j)
        pick = best_j
        tl.store(picks_ptr + b * T + i, pick.to(tl.int64))
        tl.debug_barrier()  # this step's scores, seen by every thread next step


def _launch(n: int, max_tile: int, tile_n: int | None) -> tuple[int, int, int]:
    """``(TILE_N, NUM_TILES, num_warps)`` for rows of ``n`` columns."""
    tile = tile_n if tile_n is not None else min(triton.next_power_of_2(n), max_tile)
    warps = 4 if tile <= 256 else 8 if tile <= 1024 else 16
    return tile, triton.cdiv(n, tile), warps


def _device(x: torch.Tensor) -> AbstractContextManager:
    # Triton launches on the current device: make it the tensors' (nothing on CPU, the interpreter).
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def greedy_map_fused(
    kernel: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor, t: int, *, tile_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`~tokenreduce_plugins.cdpruner.greedy_map` as one kernel: ``(picks (B, t), slots (B, t))``.

    ``kernel (B, N, N)`` float32, ``valid (B, N)`` bool, ``counts (B,)``; ``t`` steps for every
    row (rows past their count keep stepping; those picks become ``-1``). ``None`` where the
    kernel does not apply (then run the torch loop). ``tile_n`` (a power of two) forces the
    column tile, for tests of the multi-tile path.
    """
    b, n, _ = kernel.shape
    if kernel.dtype != torch.float32 or b == 0 or n == 0 or t < 1 or n > MAX_N:
        return None
    kernel = kernel.detach().contiguous()
    valid = valid.contiguous()
    cis = kernel.new_empty(b, t, n)  # row i is written at step i before any read of it
    d2 = kernel.new_empty(b, n)
    avail = torch.empty(b, n, dtype=torch.int8, device=kernel.device)
    picks = torch.empty(b, t, dtype=torch.long, device=kernel.device)
    tile, tiles, warps = _launch(n, 2048, tile_n)
    # KC earlier picks per chunk: a (KC, TILE_N) tile of c is about 8192 values.
    kc = max(2, min(16, 8192 // tile))
    with _device(kernel):
        greedy_map_kernel[(b,)](
            kernel, valid, cis, d2, avail, picks, n, t,
            FLOOR=-_FLT_MAX, FMAX=_FLT_MAX, TILE_N=tile, NUM_TILES=tiles, KC=kc,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    slots = ops.slot_mask(counts, t)
    return picks.masked_fill(~slots, -1), slots


def max_min_fused(
    dist: torch.Tensor, first_pick: torch.Tensor, score: torch.Tensor, t: int, *, tile_n: int | None = None
) -> torch.Tensor | None:
    """DivPrune's greedy loop as one kernel: ``picks (B, t)``, ``first_pick`` then ``t - 1`` steps.

    ``dist (B, N, N)`` float32 with ``-inf`` on the diagonal (a pick's own row removes it)
    and ``+inf`` at padded pairs; ``score (B, N)`` float32 (``inf`` for valid tokens,
    ``-inf`` for padding) is updated in place, as the torch loop does. Each step:
    ``score = min(score, dist[pick])``, ``pick = argmax(score)`` (first index on ties).
    Picks are not masked past a row's count (the caller does). ``None`` where the kernel
    does not apply. Distances must not be NaN (they come from finite tokens).
    """
    b, n, _ = dist.shape
    if dist.dtype != torch.float32 or score.dtype != torch.float32 or b == 0 or n == 0 or t < 1 or n > MAX_N:
        return None
    if not score.is_contiguous():
        return None  # updated in place: a copy would leave the caller's tensor stale
    dist = dist.detach().contiguous()
    first = first_pick.reshape(b).to(torch.long).contiguous()
    picks = torch.empty(b, t, dtype=torch.long, device=dist.device)
    tile, tiles, warps = _launch(n, 4096, tile_n)
    with _device(dist):
        max_min_kernel[(b,)](dist, first, score, picks, n, t, TILE_N=tile, NUM_TILES=tiles, num_warps=warps)
    return picks
