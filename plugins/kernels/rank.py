"""A stable sort's ranks and order along the last dim, by counting, as one Triton kernel.

``torch.sort(key, stable=True)`` followed by the scatter that turns its order into ranks is
three to five kernels (a copy, an index fill, the sort, the scatter), and CUDA's radix sort
of a few hundred float64 keys alone takes about 38 µs on an H200. For rows of up to
:data:`MAX_L` keys, counting is cheaper: the rank of key ``i`` is the number of keys that
sort before it, ``key[j] < key[i]`` or equal with ``j < i``; each program counts one tile of
one row's keys against the whole row and writes their ranks, and the order (``order[rank]
= i``: ranks are a permutation). One launch, no device read: a CUDA graph captures it.

Comparisons are those of CPU's stable sort: NaN after every number (first when descending),
NaN equal to NaN, ``-0.0`` equal to ``+0.0`` (so equal zeros keep their positions; CUDA's
radix sort puts ``-0.0`` first). Integer and ``uint8`` keys compare as integers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Longest row counted (work grows as the square of the row's length; longer rows are sorted).
MAX_L = 4096
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)


@triton.jit
def stable_rank_kernel(
    key_ptr,  # (R, L) contiguous
    rank_ptr,  # (R, L) int64 out
    order_ptr,  # (R, L) int64 out
    L,
    DESCENDING: tl.constexpr,
    WIDEN: tl.constexpr,  # half-precision keys: compared as float32 (exact)
    BI: tl.constexpr,
    BJ: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    live_i = i < L
    ki = tl.load(key_ptr + row * L + i, mask=live_i)[:, None]
    if WIDEN:
        ki = ki.to(tl.float32)
    nan_i = ki != ki
    count = tl.zeros([BI], tl.int32)
    for start in range(0, L, BJ):
        j = start + tl.arange(0, BJ)
        kj = tl.load(key_ptr + row * L + j, mask=j < L)[None, :]
        if WIDEN:
            kj = kj.to(tl.float32)
        nan_j = kj != kj
        if DESCENDING:
            ahead = (kj > ki) | (nan_j & ~nan_i)
        else:
            ahead = (kj < ki) | (nan_i & ~nan_j)
        tie = (kj == ki) | (nan_i & nan_j)
        ahead = (ahead | (tie & (j[None, :] < i[:, None]))) & (j < L)[None, :]
        count += tl.sum(ahead.to(tl.int32), axis=1)
    tl.store(rank_ptr + row * L + i, count.to(tl.int64), mask=live_i)
    tl.store(order_ptr + row * L + count, i.to(tl.int64), mask=live_i)


def stable_rank_order(key: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rank, order)`` of ``key`` along its last dim, both ``int64`` and of its shape, as a stable
    sort gives them; ``None`` where the kernel does not apply (a dtype not listed, an empty
    tensor, rows longer than :data:`MAX_L`): the caller sorts."""
    if key.dtype == torch.bool:
        key = key.view(torch.uint8)
    if key.dtype not in _DTYPES or key.numel() == 0 or key.dim() == 0 or key.shape[-1] > MAX_L:
        return None
    length = key.shape[-1]
    flat = key.reshape(-1, length).contiguous()
    rank = torch.empty(flat.shape, dtype=torch.int64, device=key.device)
    order = torch.empty_like(rank)
    bi = min(32, triton.next_power_of_2(length))
    bj = min(128, max(16, triton.next_power_of_2(length)))
    grid = (flat.shape[0], triton.cdiv(length, bi))
    widen = key.dtype in (torch.float16, torch.bfloat16)
    stable_rank_kernel[grid](flat, rank, order, length, DESCENDING=descending, WIDEN=widen, BI=bi, BJ=bj)
    return rank.view(key.shape), order.view(key.shape)


__all__ = ["MAX_L", "stable_rank_order", "stable_rank_kernel"]
