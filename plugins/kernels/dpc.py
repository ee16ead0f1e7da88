"""DPC-kNN's centres and assignment from the densities, as one Triton kernel per call.

After the kNN densities, density-peaks clustering is comparisons, minima and one product per
pair (:func:`tokenreduce_plugins.prunevid_cluster.dpc_knn`,
:func:`tokenreduce_plugins.holitom_ops.dpc_clusters`): which tokens are denser, each token's
distance to the nearest denser one, ``score = delta * density``, the score ranks (descending,
the lower index first on ties), the centres (the first ``clusters`` ranks), and each token's
nearest centre. As torch ops that is about twenty launches on small ``(P, n, n)`` tensors;
here one program per set holds its ``n x n`` distances (``n <= MAX_N``) and does all of it.
Every step is a comparison, a minimum or the same single product, so the results equal the
torch ops' bit for bit (tests/test_fused_scale_and_rank.py); the densities stay torch's (a
sum whose order would change their last bits).

Two ways to pick the nearest centre, as the two callers do:

* ``by_rank`` (PruneVid, the official ``cluster_dpc_knn``): token ``i`` reads the centres'
  rows, ``dist[j, i]``, and on equal distances the centre of better score wins;
* otherwise (HoliTom): token ``i`` reads its own row, ``dist[i, j]``, and the lower index wins.

A token whose nearest centre lies at ``inf`` (outside the mask, or no centres) gets ``-1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Largest set a program holds (its n x n distances twice, in registers).
MAX_N = 128


@triton.jit
def dpc_centres_kernel(
    dist_ptr,  # (P, n, n) float32 contiguous
    density_ptr,  # (P, n) float32
    valid_ptr,  # (P, n) uint8 (read with HAS_MASK)
    clusters_ptr,  # (P,) int64 (read with CLUSTERS_TENSOR)
    assign_ptr,  # (P, n) int64 out
    centre_ptr,  # (P, n) uint8 out (a bool tensor's bytes)
    n,
    clusters_value,
    HAS_MASK: tl.constexpr,
    CLUSTERS_TENSOR: tl.constexpr,
    BY_RANK: tl.constexpr,
    NB: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NB)
    ii = i[:, None]
    jj = i[None, :]
    real = i < n
    pairs = (ii < n) & (jj < n)
    base = p * n * n
    d = tl.load(dist_ptr + base + ii * n + jj, mask=pairs, other=0.0)
    dens = tl.load(density_ptr + p * n + i, mask=real, other=0.0)
    if HAS_MASK:
        ok = real & (tl.load(valid_ptr + p * n + i, mask=real, other=0) != 0)
    else:
        ok = real
    together = ok[:, None] & ok[None, :]
    within = tl.where(together, d, float("inf"))
    # The set's largest distance (distances are >= 0): the densest token's delta.
    dist_max = tl.max(tl.max(tl.where(together, d, 0.0), axis=1), axis=0)
    # higher[i, j]: j is denser than i, the lower index on equal densities.
    di = dens[:, None]
    dj = dens[None, :]
    higher = tl.where(jj < ii, dj >= di, dj > di)
    delta = tl.min(tl.where(jj < n, tl.where(higher, within, dist_max), float("inf")), axis=1)
    score = delta * dens
    if HAS_MASK:
        score = tl.where(ok, score, float("-inf"))
    si = score[:, None]
    sj = score[None, :]
    ahead = ((sj > si) | ((sj == si) & (jj < ii))) & (jj < n)
    rank = tl.sum(ahead.to(tl.int32), axis=1)
    if CLUSTERS_TENSOR:
        cut = tl.load(clusters_ptr + p)
    else:
        cut = clusters_value
    centre = (rank < cut) & real  # padded lanes (i >= n) are never centres
    if BY_RANK:
        # Token i reads the centres' rows: dist[j, i].
        dt = tl.load(dist_ptr + base + jj * n + ii, mask=pairs, other=0.0)
        vals = tl.where(centre[None, :], tl.where(together, dt, float("inf")), float("inf"))
        least = tl.min(vals, axis=1)
        best = tl.min(tl.where(centre[None, :] & (vals == least[:, None]), rank[None, :], NB), axis=1)
        nearest = tl.sum(tl.where(centre[None, :] & (rank[None, :] == best[:, None]), jj, 0), axis=1)
    else:
        vals = tl.where(centre[None, :], within, float("inf"))
        least = tl.min(vals, axis=1)
        nearest = tl.min(tl.where(vals == least[:, None], jj, NB), axis=1)
    assign = tl.where(centre, i, nearest)
    assign = tl.where(least == float("inf"), -1, assign)
    tl.store(assign_ptr + p * n + i, assign.to(tl.int64), mask=real)
    tl.store(centre_ptr + p * n + i, centre.to(tl.uint8), mask=real)


def dpc_centres(
    dist: torch.Tensor,
    density: torch.Tensor,
    valid: torch.Tensor | None,
    clusters: torch.Tensor | int,
    *,
    by_rank: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(assign (P, n) long, centre (P, n) bool)`` of the module docstring, or ``None`` where the
    kernel does not apply (sets larger than :data:`MAX_N`, not float32, empty): the caller's
    torch ops run."""
    p, n, _ = dist.shape
    if n > MAX_N or p == 0 or n == 0 or dist.dtype != torch.float32 or density.dtype != torch.float32:
        return None
    dist = dist.contiguous()
    density = density.contiguous()
    assign = torch.empty(p, n, dtype=torch.int64, device=dist.device)
    centre = torch.empty(p, n, dtype=torch.bool, device=dist.device)
    mask = valid.contiguous().view(torch.uint8) if valid is not None else density
    tensor = isinstance(clusters, torch.Tensor)
    count = clusters.contiguous() if tensor else density
    nb = max(16, triton.next_power_of_2(n))
    dpc_centres_kernel[(p,)](
        dist,
        density,
        mask,
        count,
        assign,
        centre.view(torch.uint8),
        n,
        0 if tensor else int(clusters),
        HAS_MASK=valid is not None,
        CLUSTERS_TENSOR=tensor,
        BY_RANK=by_rank,
        NB=nb,
        num_warps=8 if nb >= 128 else 4,
    )
    return assign, centre


__all__ = ["MAX_N", "dpc_centres", "dpc_centres_kernel"]
