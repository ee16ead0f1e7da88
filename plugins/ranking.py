"""Stable sort orders and ranks along the last dim, and DPC-kNN's centres, fused on CUDA.

The video reducers rank many small rows (a frame's tokens, a row's scores) with a stable
sort and a scatter of its order; on CUDA with Triton one counting kernel
(:mod:`tokenreduce_plugins.kernels.rank`) gives both, and elsewhere the torch ops run. The
results are equal, except that the kernel compares ``-0.0`` equal to ``+0.0`` as CPU's sort
does (CUDA's radix sort puts ``-0.0`` first): equal zeros keep their positions. Their
density-peaks clustering, after the densities, is one kernel too
(:mod:`tokenreduce_plugins.kernels.dpc`: the same bits).
"""

from __future__ import annotations

import torch

from tokenreduce import fused

from .constants import positions


def _fused(key: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not fused.triton_wanted(key):
        return None
    from .kernels import rank  # imports Triton: only reached on CUDA with Triton installed

    return rank.stable_rank_order(key, descending)


def stable_order(key: torch.Tensor, *, descending: bool = False) -> torch.Tensor:
    """``torch.sort(key, dim=-1, descending=descending, stable=True).indices``."""
    done = _fused(key, descending)
    if done is not None:
        return done[1]
    return torch.sort(key, dim=-1, descending=descending, stable=True).indices


def stable_rank(key: torch.Tensor, *, descending: bool = False) -> torch.Tensor:
    """The position of each entry of ``key`` in its row's stable sort (the inverse of :func:`stable_order`)."""
    return rank_and_order(key, descending=descending)[0]


def rank_and_order(key: torch.Tensor, *, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stable_rank(key), stable_order(key))``, from one sort (or one kernel)."""
    done = _fused(key, descending)
    if done is not None:
        return done
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, positions(order.shape[-1], order.device).expand_as(order))
    return rank, order


def fused_centres(
    dist: torch.Tensor, density: torch.Tensor, valid: torch.Tensor | None, clusters: torch.Tensor | int, *, by_rank: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DPC-kNN's ranks, centres and assignment from the densities as one kernel
    (:func:`tokenreduce_plugins.kernels.dpc.dpc_centres`), or ``None`` (CPU, no Triton, disabled,
    sets too large): the caller's torch ops run."""
    if not fused.triton_wanted(dist):
        return None
    from .kernels import dpc  # imports Triton: only reached on CUDA with Triton installed

    return dpc.dpc_centres(dist, density, valid, clusters, by_rank=by_rank)


__all__ = ["fused_centres", "rank_and_order", "stable_order", "stable_rank"]
